"""The CPU shims of megatron_effmlm.compat.cpu, each against the megatron-core code it covers."""

import subprocess
import sys

import torch

from conftest import REPO_ROOT


def test_cuda_device_requests_land_on_cpu(mcore_single):
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversions untouched


def test_megatron_grad_norm_and_clipping(mcore_single):
    """optimizer/clip_grads.py: CUDA tensors and a 'torch.cuda.FloatTensor' assert."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn_like(p)
    expected = torch.cat([p.grad.flatten() for p in ps]).norm().item()
    norm = get_grad_norm_fp32([p.grad for p in ps])
    assert abs(norm - expected) < 1e-5 * expected
    clip_grad_by_total_norm_fp32(ps, max_norm=1.0, total_norm=norm)
    assert abs(torch.cat([p.grad.flatten() for p in ps]).norm().item() - 1.0) < 1e-5


def test_rng_tracker_forks_cpu_streams(mcore_single):
    """tensor_parallel/random.py: attention dropout forks the model-parallel state."""
    from megatron.core import tensor_parallel

    from megatron_effmlm.compat.cpu import CPURNGStatesTracker

    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, CPURNGStatesTracker)
    saved = tracker.get_states()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream did not move
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the forked stream advanced
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(4), a)  # and is restorable (checkpoint/resume)


def test_inactive_when_cuda_is_present():
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "from megatron_effmlm.compat import cpu\n"
        "assert cpu.activate() is False and not cpu.is_active()\n"
        "assert torch.zeros(1).type() == 'torch.FloatTensor'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
