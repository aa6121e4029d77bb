"""Run megatron-core on a machine without CUDA (CPU tensors, gloo process groups).

megatron-core assumes a CUDA device in a few places. Everything that gets past those
assumptions lives here, and `activate()` does nothing when CUDA is available, so GPU runs
use megatron-core untouched. No megatron-core code is copied: each shim replaces a
*torch* entry point that megatron-core calls, or installs a megatron-core extension point
(the RNG tracker) with a CPU implementation.

Shims, and the megatron-core 0.16 call sites each one covers:

1. `torch.cuda.current_device()` returns the CPU device.
   tensor_parallel/layers.py, mappings.py, utils.py (`GlobalMemoryBuffer.get_tensor`, used
   by `dot_product_attention.py`), pipeline_parallel/p2p_communication.py (shape exchange),
   distributed/param_and_grad_buffer.py (DDP buffers).
2. `torch.cuda.synchronize()` is a no-op (p2p_communication.py, dist_checkpointing), and
   `torch.cuda.get_rng_state()` returns an empty state: tensor_parallel/random.py's
   `CheckpointFunction` (activation recomputation) records the CUDA generator beside the CPU
   one and the tracker's; restoring the empty state is a queued lazy call that never runs.
3. A CPU RNG-states tracker (`CPURNGStatesTracker`) installed as megatron-core's tracker.
   tensor_parallel/random.py: `CudaRNGStatesTracker.add/fork` read and write CUDA
   generator states; attention dropout forks the model-parallel state even at dropout 0.
4. `_CudaToCpuMode`, a TorchFunctionMode that maps CUDA device arguments (`device="cuda"`,
   `.cuda()`, `.to("cuda")`) to the CPU and makes `Tensor.type()` report the CUDA type name.
   pipeline_parallel/schedules.py (`total_num_tokens` on "cuda"), optimizer/optimizer.py
   (found_inf, loss-scale tensors, `param.type()` dtype dispatch), optimizer/clip_grads.py
   (`device='cuda'` tensors, `grad.type() == 'torch.cuda.FloatTensor'` assert),
   optimizer/distrib_optimizer.py (the same type check),
   models/common/language_module/language_module.py (`.cuda()` on the tied embedding),
   dist_checkpointing/exchange_utils.py.

Config switches are preferred over shims where megatron-core has one: the model config
sets `use_cpu_initialization=True`, `gradient_accumulation_fusion=False` and leaves the
fusions off (see `megatron_effmlm.config`).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ACTIVE = False
_MODE = None
CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA device requests to the CPU (shim 4)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], CPU, *args[2:])
        return func(*args, **kwargs)


class CPURNGStatesTracker:
    """megatron-core's RNG-states tracker on the CPU generator (shim 3).

    Same interface as `tensor_parallel.random.CudaRNGStatesTracker`: named generator
    states; `fork(name)` swaps a state in for the duration of a block.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _install_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def is_active() -> bool:
    return _ACTIVE


def activate() -> bool:
    """Install the shims when CUDA is absent. Idempotent; returns whether they are active."""
    global _ACTIVE, _MODE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = lambda: CPU  # shim 1
    torch.cuda.synchronize = lambda *a, **k: None  # shim 2
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    _install_rng_tracker()  # shim 3
    _MODE = _CudaToCpuMode()  # shim 4: stays on for the process (this thread's mode stack)
    _MODE.__enter__()
    _ACTIVE = True
    logger.info("megatron_effmlm.compat.cpu: no CUDA, running megatron-core on the CPU")
    return True


# bf16 on the CPU: oneDNN runs bf16 GEMMs natively only with these instructions; without them
# it emulates bf16 and is slower than fp32, so `--bf16` is refused there.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The processor's feature flags (the `flags` line of /proc/cpuinfo; empty if unreadable)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_error(flags: set[str] | None = None) -> str | None:
    """None when this CPU has native bf16 instructions, else the reason `--bf16` is refused."""
    flags = cpu_flags() if flags is None else flags
    if any(f in flags for f in CPU_BF16_FLAGS):
        return None
    return (f"--bf16 without CUDA needs a processor with bf16 instructions ({' or '.join(CPU_BF16_FLAGS)} in "
            "/proc/cpuinfo's flags); this one has neither, so CPU runs train in fp32")
