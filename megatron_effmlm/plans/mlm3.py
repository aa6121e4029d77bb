"""3ML, "mask more and mask later" (Liao et al., 2022).

The encoder's layers run on the positions whose input is not [MASK]; before the first
decoder layer, `e_mask + P[pos]` enters at every other position, and the decoder layers run
on the whole sequence. With learned absolute positions, scattering the injected vectors to
their positions is the same computation as appending them (attention does not see order).
"""

import torch

from megatron_effmlm.model.engine import LiveSet, PlanStep, TokenPlan
from megatron_effmlm.plans.base import Policy, real_positions, register


@register("3ml")
class ThreeMLPolicy(Policy):
    default_mask_prob = 0.5
    default_mask_80_10_10 = False  # the encoder never sees the masked tokens

    def __init__(self, decoder_layers: int = 2, **kw):
        super().__init__(**kw)
        self.decoder_layers = decoder_layers

    def plan(self, batch, step):
        text, pad = batch["text"], batch["padding_mask"].bool()
        kept = pad & (text != self.tokenizer.mask)  # [b, T]
        return TokenPlan(
            seq_len=text.shape[1],
            input_live=LiveSet.from_mask(kept),
            steps={self.num_layers: PlanStep(live=real_positions(batch), inject=True)},
        )
