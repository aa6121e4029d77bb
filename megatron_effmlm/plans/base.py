"""Method policies: what a pre-training method decides, and nothing else.

A policy turns a batch into model inputs (the token plan) and the model's output into a
loss; the one training loop calls it and never branches on the method. A new method is a
new file in this package with a `Policy` subclass registered under its `--method` name: its
flags, their defaults and checks (`flags`, `defaults`), what it needs of the model
(`model_overrides`), its FLOP model (`layer_costs`) and its extra loss reports
(`report_keys`) are all declared there, and the parser, the trainer, the FLOP counts and the
benchmarks read them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple, Type

import torch

from megatron_effmlm.config import ConfigError
from megatron_effmlm.model.plan import LiveSet, MLMOutput, TokenPlan

POLICIES: Dict[str, Type["Policy"]] = {}


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag of a method. `dest` is the policy constructor's keyword; the
    parser's default is None (not given), so each method's own default applies
    (`Policy.defaults`, else `default`). `check(value)` returns what is wrong, or None."""

    name: str
    dest: str
    default: Any
    help: str
    type: Optional[Callable] = None  # None with action="store_true"
    choices: Optional[Tuple] = None
    action: Optional[str] = None
    check: Optional[Callable[[Any], Optional[str]]] = None

    def add_to(self, group) -> None:
        shown = "" if self.action else f" (default: {self.default})"
        kw = dict(dest=self.dest, default=None, help=self.help + shown)
        if self.action:
            kw["action"] = self.action
        else:
            kw.update(type=self.type, choices=self.choices)
        group.add_argument(self.name, **kw)


def all_flags() -> Dict[str, Flag]:
    """Every registered method's flags by name (a flag shared by methods is declared once, by
    one of them, and reused by the others as the same object)."""
    out: Dict[str, Flag] = {}
    for name in sorted(POLICIES):
        for f in POLICIES[name].flags:
            if out.setdefault(f.name, f) != f:
                raise ValueError(f"{f.name} is declared twice, differently ({name} and another method)")
    return out


def register(name: str):
    def deco(cls):
        cls.name = name
        POLICIES[name] = cls
        return cls

    return deco


def get_policy(name: str, **kwargs) -> "Policy":
    if name not in POLICIES:
        raise ConfigError(f"--method {name!r} is not known; choose one of {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)


class Policy:
    """Base policy = vanilla MLM. Subclasses override `plan` (and maybe `consistency_plan`,
    `loss`, `after_step`, `state_dict`)."""

    name = "base"
    # What the method needs from the data (read by the argument parser).
    default_mask_prob = 0.15
    default_mask_80_10_10 = True
    flags: Tuple[Flag, ...] = ()  # this method's command-line flags
    defaults: Dict[str, Any] = {}  # dest -> this method's default, where it differs from the flag's
    # the loss terms it reports besides "lm loss" (each a [sum, count] pair in the report)
    report_keys: Tuple[str, ...] = ("sop loss",)

    @classmethod
    def options(cls, given: Dict[str, Any]) -> Dict[str, Any]:
        """Constructor keywords from parsed flag values by dest (None or absent: not given)."""
        out = {}
        for f in cls.flags:
            v = given.get(f.dest)
            out[f.dest] = v if v is not None else cls.defaults.get(f.dest, f.default)
        return out

    @classmethod
    def model_overrides(cls, options: Dict[str, Any]) -> Dict[str, Any]:
        """ModelConfig fields this method sets (3ML: its decoder)."""
        return {}

    @classmethod
    def check_options(cls, options: Dict[str, Any], seq_length: int) -> Optional[str]:
        """What is wrong with this method's options together with the model (None: nothing)."""
        return None

    def __init__(self, tokenizer=None, binary_head: bool = False, num_layers: int = 0, seed: int = 0, **options):
        self.tokenizer = tokenizer
        self.binary_head = binary_head
        self.num_layers = num_layers
        self.seed = seed
        self.options = options
        self.training = True  # evaluation runs the plain model for token-dropping methods

    @classmethod
    def layer_costs(cls, shape, **options):
        """(forward FLOPs per sequence of each encoder layer, the last stage's extra: decoder
        layers and the LM head), by the FLOP model (model/flops.py; `shape` a flops.Shape,
        `options` this method's constructor keywords). The progress line's predictions,
        --train-flops-budget's schedule, pipeline balancing and the benchmarks all read it."""
        return [shape.layer(shape.seq_len)] * shape.num_layers, shape.head()

    def plan(self, batch: dict, step: int) -> Optional[TokenPlan]:
        """The token plan of this micro-batch; None = every position live at every layer."""
        return None

    def consistency_plan(self, batch: dict, step: int) -> Optional[TokenPlan]:
        """A second pass on the same batch (ScTD's consistency steps)."""
        return None

    def model_inputs(self, batch: dict, step: int) -> dict:
        """Keyword arguments of the model's forward for this micro-batch."""
        seq_len = batch["text"].shape[1]
        positions = torch.arange(seq_len, device=batch["text"].device).expand_as(batch["text"])
        return dict(
            input_ids=batch["text"],
            position_ids=positions,
            padding_mask=batch["padding_mask"],
            loss_mask=batch["loss_mask"],
            labels=batch["labels"],
            tokentype_ids=batch.get("types") if self.binary_head else None,
            is_random=batch.get("is_random") if self.binary_head else None,
            plan=self.plan(batch, step),
            consistency_plan=self.consistency_plan(batch, step) if self.training else None,
        )

    def loss(self, out: MLMOutput):
        """(loss summed over predicted tokens, number of predicted tokens, report).

        The schedule divides the step's gradient by the global number of predicted tokens."""
        # a fill on the device, not a copy of a host number (a blocking copy would sync a GPU)
        num_tokens = torch.full((), out.lm_losses.numel(), dtype=torch.int, device=out.lm_losses.device)
        lm_sum = out.lm_losses.sum()
        total = lm_sum
        report = {"lm loss": torch.stack([lm_sum.detach(), num_tokens.float()])}
        if out.binary_loss is not None:
            # Weight the sentence-order mean so it enters like Megatron-LM's lm_loss + sop_loss.
            sop_mean = out.binary_loss.mean()
            total = total + sop_mean * num_tokens
            report["sop loss"] = torch.stack([sop_mean.detach() * num_tokens, num_tokens.float()])
        return total, num_tokens, report

    def after_step(self, step: int) -> None:
        """Called on every rank after each optimizer step (collectives allowed)."""

    def discard_step(self) -> None:
        """Called on every rank instead of after_step when the step was skipped (non-finite)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def static_width(n: int) -> Optional[int]:
    """n: a live set's width known from the batch shape and the method's ratios, to pad to
    instead of the batch's own maximum count (whose read would stall a GPU's queue). Under
    pipeline parallelism None (that maximum): the stages exchange the carry's shape on the host
    anyway, and a padded live set would be sent with its padding."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        return None
    return n


def real_positions(batch) -> LiveSet:
    """Every position of each row, pads masked out as keys (the identity live set)."""
    return LiveSet.all_positions(batch["padding_mask"])
