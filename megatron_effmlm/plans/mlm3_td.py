"""3ML with token dropping inside its encoder (`--method 3ml-td`), a combination of the two.

3ML's encoder runs on the unmasked tokens only. Here its middle layers run on the most
important of them: as in token dropping, layers 0..L/2-1 see every unmasked token, the
following ones only the top `--td-keep-ratio` of each row's unmasked tokens by the importance
table (learned from the MLM loss per label id, identical on every rank), and the dropped ones
return before the encoder's last layer with their states from before the drop. Then
`e_mask + P[pos]` enters at the masked positions and the decoder runs as in 3ML (`self` or
`cross`). Evaluation runs the encoder without dropping (token dropping's rule).

The whole method is this file: its flags are 3ML's and token dropping's, reused.
"""

from megatron_effmlm.model.plan import LiveSet, PlanStep, TokenPlan
from megatron_effmlm.plans.base import real_positions, register
from megatron_effmlm.plans.mlm3 import DECODER_LAYERS, DECODER_TYPE, ThreeMLPolicy
from megatron_effmlm.plans.token_drop import BETA, KEEP_RATIO, TokenDropPolicy, kept_bound, select_kept


@register("3ml-td")
class ThreeMLTokenDropPolicy(TokenDropPolicy):
    default_mask_prob = 0.5  # 3ML's
    default_mask_80_10_10 = False  # the encoder never sees the masked tokens
    flags = (DECODER_LAYERS, DECODER_TYPE, KEEP_RATIO, BETA)
    model_overrides = ThreeMLPolicy.__dict__["model_overrides"]

    def __init__(self, decoder_layers: int = 2, decoder_type: str = "self", **kw):
        super().__init__(**kw)  # the importance table and its update: token dropping's
        self.decoder_layers, self.decoder_type = decoder_layers, decoder_type

    @classmethod
    def layer_costs(cls, shape, decoder_layers: int = 2, decoder_type: str = "self", td_keep_ratio: float = 0.5,
                    **options):
        T, L = shape.seq_len, shape.num_layers
        u = T - shape.predicted  # the encoder's tokens
        k, c = round(td_keep_ratio * u), L // 2 - 1
        enc = [shape.layer(u) if (l <= c or l == L - 1) else shape.layer(k) for l in range(L)]
        return enc, ThreeMLPolicy.layer_costs(shape, decoder_layers, decoder_type)[1]  # decoder + head

    def plan(self, batch, step):
        text, pad = batch["text"], batch["padding_mask"].bool()
        unmasked = pad & (text != self.tokenizer.mask)  # [b, T]
        encoder = LiveSet.from_mask(unmasked)
        cross = self.decoder_type == "cross"
        decoder = LiveSet.from_mask(batch["loss_mask"].bool() & pad) if cross else real_positions(batch)
        c, L = self.drop_layer, self.num_layers
        steps = {L: PlanStep(live=decoder, inject=True)}
        if self.training:
            kept = select_kept(self._table_on(text.device)[text], unmasked, self.keep_ratio)
            width = min(kept.n, kept_bound(encoder.n, self.keep_ratio))  # no row keeps more
            steps.update({
                c: PlanStep(snapshot=True),  # unmasked states from before the drop; mask vectors elsewhere
                c + 1: PlanStep(live=LiveSet(kept.idx[:, :width], kept.valid[:, :width])),
                L - 1: PlanStep(live=encoder),  # the dropped tokens come back
            })
        return TokenPlan(seq_len=text.shape[1], input_live=encoder, steps=steps, decoder_context=cross)
