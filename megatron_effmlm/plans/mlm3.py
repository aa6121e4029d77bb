"""3ML, "mask more and mask later" (Liao et al., 2022), self and cross variants.

The encoder's layers run on the positions whose input is not [MASK]; before the first
decoder layer, `e_mask + P[pos]` enters at every other position, and the decoder layers run
on the whole sequence. With learned absolute positions, scattering the injected vectors to
their positions is the same computation as appending them (attention does not see order).

3ML-cross (`decoder_type="cross"`): the decoder stream is the predicted positions only
(their injected vectors); each decoder layer has self-attention over that stream and
cross-attention to the encoder's output (the kept tokens). The paper leaves the details open;
this is the MAE-LM-like reading, and it is cheaper than the self variant.
"""

from megatron_effmlm.model.plan import LiveSet, PlanStep, TokenPlan
from megatron_effmlm.model.flops import cross_attention_flops
from megatron_effmlm.plans.base import Flag, Policy, real_positions, register

DECODER_LAYERS = Flag("--decoder-layers", "decoder_layers", 2, "3ML's methods: decoder layers after the mask injection",
                      type=int, check=lambda v: None if v >= 1 else f"must be >= 1 for --method 3ml, got {v}")
DECODER_TYPE = Flag("--3ml-decoder", "decoder_type", "self",
                    "3ML's methods: the decoder's stream: self (every position) or cross (the masked positions, "
                    "cross-attending to the encoder's output)", type=str, choices=("self", "cross"))


@register("3ml")
class ThreeMLPolicy(Policy):
    default_mask_prob = 0.5
    default_mask_80_10_10 = False  # the encoder never sees the masked tokens
    flags = (DECODER_LAYERS, DECODER_TYPE)

    @classmethod
    def model_overrides(cls, options):
        return dict(decoder_layers=options["decoder_layers"], decoder_type=options["decoder_type"])

    def __init__(self, decoder_layers: int = 2, decoder_type: str = "self", **kw):
        super().__init__(**kw)
        self.decoder_layers, self.decoder_type = decoder_layers, decoder_type

    @classmethod
    def layer_costs(cls, shape, decoder_layers: int = 2, decoder_type: str = "self", **options):
        T, m = shape.seq_len, shape.predicted
        enc = [shape.layer(T - m)] * shape.num_layers  # the unmasked tokens
        if decoder_type == "cross":  # the masked positions, cross-attending to the encoder's output
            dec = decoder_layers * (shape.layer(m) + cross_attention_flops(m, T - m, shape.hidden_size))
        else:
            dec = decoder_layers * shape.layer(T)
        return enc, dec + shape.head()

    def plan(self, batch, step):
        text, pad = batch["text"], batch["padding_mask"].bool()
        kept = pad & (text != self.tokenizer.mask)  # [b, T]
        if self.decoder_type == "cross":
            decoder_live = LiveSet.from_mask(batch["loss_mask"].bool() & pad)
        else:
            decoder_live = real_positions(batch)
        return TokenPlan(
            seq_len=text.shape[1],
            input_live=LiveSet.from_mask(kept),
            steps={self.num_layers: PlanStep(live=decoder_live, inject=True)},
            decoder_context=self.decoder_type == "cross",
        )
