"""model/dropout.py: the CPU dropout built from 15-bit integers. Its masks keep each element with
probability 1 - round(p * 2^15) / 2^15 independently, its output and gradient are the input's
masked and scaled by the same factor, it draws from torch's CPU generator (so seeds, megatron-core's
RNG forks and recomputation replay it), and the CPU model uses it everywhere torch.nn.Dropout or
megatron-core's bias-dropout-add would run."""

import math

import pytest
import torch

from megatron_effmlm.model.dropout import Dropout15, dropout15, keep_mask, quantized_p

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dropout (GPUs keep torch's)")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_rate_and_independence(p):
    torch.manual_seed(0)
    n = 1_000_001  # odd: the last 32-bit draw is half used
    keep = keep_mask((n,), p)
    q = 1 - quantized_p(p)
    sd = math.sqrt(q * (1 - q) / n)
    assert abs(keep.float().mean().item() - q) < 5 * sd
    # neighbours (the two halves of one 32-bit draw) are uncorrelated
    a, b = keep[0:-1:2].float(), keep[1::2].float()
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(corr.item()) < 5 / math.sqrt(n / 2)
    assert abs(quantized_p(p) - p) <= 2 ** -16


def test_output_and_gradient_are_the_masked_scaled_input():
    x = torch.randn(64, 3, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = dropout15(x, 0.1)
    torch.manual_seed(5)
    keep = keep_mask(x.shape, 0.1)
    scale = 1 / (1 - quantized_p(0.1))
    torch.testing.assert_close(y, x.detach() * keep * scale, rtol=0, atol=0)
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * keep * scale, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: (torch.manual_seed(1), dropout15(t, 0.3))[1], (x.detach().requires_grad_(),))


def test_follows_torch_generator_and_eval_is_identity():
    m = Dropout15(0.2)
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = m(x)
    torch.manual_seed(3)
    assert torch.equal(a, m(x))  # seeded by torch's CPU generator
    assert not torch.equal(a, m(x))  # and advances it
    m.eval()
    assert m(x) is x
    assert dropout15(x, 0.0) is x


def test_model_uses_it_for_every_dropout(mcore_single, demo_batch, demo_tokenizer):
    """Every dropout of a CPU model is Dropout15 or the integer-mask bias-dropout-add; with
    dropout on, two seeds differ and one seed repeats (a training step is reproducible)."""
    from precision_helpers import batch_for, policy_for
    from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_effmlm.model import dropout
    from megatron_effmlm.model.builder import build_model, build_transformer_config
    from megatron_effmlm.parallel.init import set_seed

    for arch in ("megatron-bert", "bert"):
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=2, seq_length=64,
                          vocab_size=demo_tokenizer.vocab_size, hidden_dropout=0.1, attention_dropout=0.1, model_arch=arch)
        model = build_model(cfg, ParallelConfig(), build_transformer_config(cfg, ParallelConfig(), PrecisionConfig()),
                            wrap_ddp=False)[0]
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all(type(m) is Dropout15 for m in drops)
        if arch == "megatron-bert":  # (post-LN wraps the same builder with its LayerNorm)
            for layer in model.encoder.layers:
                for bda in (layer.self_attn_bda, layer.mlp_bda):
                    assert bda(True, False).func is dropout._bias_dropout_add
        policy = policy_for("vanilla", demo_tokenizer)
        batch = batch_for(demo_batch, demo_tokenizer, "vanilla")

        def loss(seed):
            set_seed(seed)  # torch's generator and megatron-core's tracker (attention dropout forks it)
            total, n, _ = policy.loss(model(**policy.model_inputs(batch, 0)))
            return float(total / n)

        assert loss(1) == loss(1) != loss(2)
