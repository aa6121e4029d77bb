"""The LR schedule on resume: Megatron-LM's `--override-opt_param-scheduler` and
`--use-checkpoint-opt_param-scheduler`, with a clear error where it asserts.

megatron-core's OptimizerParamScheduler keeps its position (`num_steps`, in samples) and its
shape (peak and minimum LR, warm-up and decay lengths in samples, decay style, weight decay)
in the checkpoint. Megatron-LM's default is neither flag: the shape on the command line must
equal the checkpoint's. A resume with a larger `--train-iters` (or another
`--global-batch-size`) changes the decay length, and the checkpoint's shape, kept silently,
would train every step past its end at `--min-lr`.
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_effmlm.checkpoint.dist_ckpt import CheckpointError

OVERRIDE = "--override-opt_param-scheduler"
USE_CHECKPOINT = "--use-checkpoint-opt_param-scheduler"

# state-dict key -> what the command line sets it with
_SHAPE = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "samples: --lr-warmup-iters x --global-batch-size",
    "lr_decay_steps": "samples: --lr-decay-iters (default --train-iters) x --global-batch-size",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
    "wd_incr_steps": "samples: --lr-decay-iters (default --train-iters) x --global-batch-size",
    "wd_incr_style": "constant",
}


class ResumableScheduler(OptimizerParamScheduler):
    """megatron-core's scheduler; a checkpoint whose schedule differs from the command line's is
    an error naming both flags (raised by `check_loaded`, after the checks of what matters more:
    the model and the tokenizer), unless one of the flags says which one wins."""

    def __init__(self, *args, source: str = "", **kwargs):
        self.source = source  # the --load folder, for the message
        self.mismatch = ""
        super().__init__(*args, **kwargs)

    def check_loaded(self) -> None:
        if self.mismatch:
            raise CheckpointError(self.mismatch)

    def load_state_dict(self, state_dict: dict) -> None:
        self.mismatch = ""  # a fallback to an earlier checkpoint loads again
        if not (self.override_opt_param_scheduler or self.use_checkpoint_opt_param_scheduler):
            here = self.state_dict()
            keys = [k for k in _SHAPE if k in state_dict and state_dict[k] != here[k]]
            if "lr_decay_steps" in keys and "wd_incr_steps" in keys:
                keys.remove("wd_incr_steps")  # the same flags: say it once
            diff = [f"{k} {state_dict[k]} there and {here[k]} here ({_SHAPE[k]})" for k in keys]
            if diff:  # megatron-core's own check would assert: keep the message for check_loaded
                self.mismatch = (
                    f"--load {self.source}: the checkpoint's LR schedule differs from the command line's: "
                    f"{'; '.join(diff)}. Give {OVERRIDE} to follow the command line's schedule from the "
                    f"checkpoint's position, or {USE_CHECKPOINT} to keep the checkpoint's")
                return
        super().load_state_dict(state_dict)


def zero_lr_warning(lr: float, scheduler: OptimizerParamScheduler, iteration: int) -> str:
    """The warning for a step about to train at learning rate 0, or "" (none needed: a
    positive LR, or the first step of a warm-up from 0)."""
    if lr != 0.0 or (scheduler.lr_warmup_steps > 0 and scheduler.num_steps == 0):
        return ""
    if scheduler.max_lr == 0.0:
        why = "--lr is 0"
    elif scheduler.num_steps >= scheduler.lr_decay_steps:
        why = (f"the LR schedule ended at sample {scheduler.lr_decay_steps} (--lr-decay-iters or --train-iters "
               f"x --global-batch-size), this run is at sample {scheduler.num_steps}, and --min-lr is 0")
    else:
        why = "the LR schedule gives 0 here"
    return (f"warning: iteration {iteration} trains at learning rate 0 ({why}): its update changes no weight "
            "(said once per run)")
