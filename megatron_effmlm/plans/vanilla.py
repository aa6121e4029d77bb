"""Vanilla MLM (BERT / RoBERTa): every position live at every layer; the head reads the
masked positions (the base policy's behaviour)."""

from megatron_effmlm.plans.base import Policy, register


@register("vanilla")
class VanillaPolicy(Policy):
    pass
