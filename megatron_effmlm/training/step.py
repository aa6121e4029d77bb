"""One step on any layout, shared by the trainer and the benchmarks (bench/step_time.py).

`build_optimizer` is megatron-core's optimizer as every run uses it; `wire_grads` tells
megatron-core's schedule how to finalise, scale and defer gradients; `Step` runs the
forward-backward schedule over the model chunks with a policy's inputs and loss. What
happens around it (finiteness, the LR scheduler, counters) is the trainer's; a benchmark
times `forward_backward` and the update separately.
"""

from __future__ import annotations

import torch

from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_effmlm.config import OptimConfig, PrecisionConfig
from megatron_effmlm.model.builder import unwrap
from megatron_effmlm.model.mlm_model import allreduce_tied_injection_grads
from megatron_effmlm.parallel.p2p import schedule_kwargs


def build_optimizer(model: list, optim: OptimConfig, prec: PrecisionConfig, use_distributed_optimizer: bool = False):
    """megatron-core's Adam over the model chunks (torch's fused AdamW where megatron-core
    falls back to torch's, compat/gpu_fallbacks.py)."""
    from megatron_effmlm.compat.gpu_fallbacks import fuse_torch_adamw

    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad, bf16=prec.bf16, fp16=prec.fp16, params_dtype=prec.params_dtype,
            loss_scale=prec.loss_scale, initial_loss_scale=prec.initial_loss_scale,
            min_loss_scale=prec.min_loss_scale, loss_scale_window=prec.loss_scale_window,
            hysteresis=prec.hysteresis, use_distributed_optimizer=use_distributed_optimizer,
        ),
        model,
    )
    fuse_torch_adamw(optimizer)
    return optimizer


def _finalize_model_grads(model, *args, **kwargs):
    """megatron-core's finalize_model_grads, then 3ML's tied injection tensors (PP > 1)."""
    finalize_model_grads(model, *args, **kwargs)
    allreduce_tied_injection_grads(model)


def wire_grads(tconfig, model: list, optimizer) -> None:
    """What megatron-core's schedule calls around backward: gradient all-reduce (+ 3ML's tied
    tensors), loss scaling, and no_sync for all but the last micro-batch."""
    tconfig.finalize_model_grads_func = _finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    no_sync = [m.no_sync for m in model]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync


class Step:
    """The forward-backward schedule of a policy's model over micro-batches and stages.

    policy: builds each micro-batch's model inputs and turns the model's output into a loss
    (an object with `model_inputs(batch, step)` and `loss(output)`). After each call,
    `tokens` is this rank's count of non-padding input tokens read."""

    def __init__(self, model: list, policy, tconfig, micro_batch_size: int, seq_length: int):
        self.model, self.policy = model, policy
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.schedule_kwargs = schedule_kwargs(tconfig)  # the pipeline communicator (PP > 1), built once
        self.step_index = 0
        self.tokens = 0

    def zero_grads(self, optimizer) -> None:
        for m in self.model:
            inner = unwrap(m)
            if hasattr(inner, "forward_flops"):
                inner.forward_flops = 0.0
            m.zero_grad_buffer()
        optimizer.zero_grad()

    def forward_step(self, data_iterator, model):
        """One micro-batch: the policy's inputs through the model; (output, the policy's loss)."""
        batch = next(data_iterator)
        if getattr(unwrap(model), "vp_stage", None) in (None, 0):  # every chunk reads the batch
            self.tokens += int(batch["padding_mask"].sum())
        if torch.cuda.is_available():
            batch = {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = model(**self.policy.model_inputs(batch, self.step_index))
        return out, self.policy.loss

    def forward_backward(self, data_iterator, num_microbatches: int, step_index: int, forward_only: bool = False):
        """megatron-core's schedule: the per-micro-batch loss reports (on the last stage)."""
        self.step_index, self.tokens = step_index, 0
        return get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=num_microbatches,
            seq_length=self.seq_length,  # unused: every message carries its own shape
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
            **self.schedule_kwargs,
        )
