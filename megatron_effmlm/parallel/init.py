"""Process-group and RNG set-up for any layout (torchrun or a single process)."""

from __future__ import annotations

import datetime
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from megatron_effmlm.compat import cpu as cpu_compat


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size=None,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
):
    """Start torch.distributed (nccl on GPU, gloo on CPU), megatron-core's parallel state
    and the RNG states. Works under torchrun and in a plain single process."""
    from megatron.core import parallel_state, tensor_parallel

    cpu_compat.activate()
    from megatron_effmlm.compat import gpu_fallbacks

    gpu_fallbacks.activate()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:  # torchrun, srun wrappers: env:// rendezvous
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain single process
            dist.init_process_group(
                backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                timeout=timeout,
            )
    world = dist.get_world_size()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % mp:
        raise ValueError(
            f"world size {world} is not divisible by --tensor-model-parallel-size "
            f"{tensor_model_parallel_size} x --pipeline-model-parallel-size {pipeline_model_parallel_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            # every group it creates honours --distributed-timeout-minutes (its default: 30)
            distributed_timeout_minutes=timeout_minutes,
        )
        from megatron_effmlm.parallel.p2p import build_shape_group

        build_shape_group(datetime.timedelta(minutes=timeout_minutes))
    set_seed(seed)


def set_seed(seed: int):
    """Seed python, numpy and torch (different per pipeline stage, as Megatron-LM does) and
    megatron-core's model-parallel RNG states."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _held_groups(module) -> list:
    """The process groups a module holds in its globals (a group, or a list or tuple of them)."""
    found = {}
    for value in vars(module).values():
        for g in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(g, dist.ProcessGroup) and g is not dist.group.WORLD:
                found[id(g)] = g
    return list(found.values())


def destroy_model_parallel():
    """Tear down megatron-core's groups but keep torch.distributed (another layout may follow).

    megatron-core only forgets most of its groups (it shuts down its gloo data-parallel ones);
    they are shut down here too: a process that switches layouts (the tests, the benchmarks)
    otherwise keeps ~17 live groups per layout, and measured 16% slower after 45 layouts."""
    from megatron.core import parallel_state

    from megatron_effmlm.parallel.p2p import destroy_shape_group

    groups = _held_groups(parallel_state) + [g for g in (destroy_shape_group(),) if g is not None]
    parallel_state.destroy_model_parallel()
    for g in groups:
        try:
            dist.destroy_process_group(g)
        except ValueError:  # "Invalid process group specified": megatron-core shut it down already
            pass


def destroy():
    if "megatron.core.parallel_state" in sys.modules:  # else nothing to tear down, and no 6 s import
        destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where tensors for torch.distributed collectives must live: the GPU under NCCL."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
