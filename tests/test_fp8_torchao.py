"""FP8 without Transformer Engine: torchao's float8 matmul in the local spec's parallel linears
(megatron_effmlm/model/fp8_torchao.py), its selection (model/backends.py) and its flags' errors.

torch 2.13's CPU build runs `torch._scaled_mm` on float8 tensors (a reference kernel: 1024 x 256
x 1024 took 0.15 s rowwise, 22 s tensorwise, against 9 ms in bf16), so the real float8 path runs
here, on a model small enough for that. The GPU numeric
test is tests/test_gpu.py's test_torchao_fp8_matches_bf16."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, needs_cpu_bf16, run_scenarios, tiny_model_args

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path (tests/test_gpu.py covers CUDA)")

L, H, NH = 2, 64, 4
LAYERS = {"token-drop": 4}  # its plan needs 4 layers; every other method runs on L
TORCHAO = "torchao 0.18.0, torch._scaled_mm on the CPU (a reference kernel, 16 to 2000 times slower than bf16 " \
          "GEMMs: for tests, not for training)"


def fp8_model(vocab, method="vanilla", fp8_format=None, recipe=None, recompute=None, compile=False):
    from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_effmlm.model.builder import build_model, build_transformer_config

    torch.manual_seed(0)
    dec = dict(decoder_layers=2, decoder_type="cross" if method == "3ml-cross" else "self") if method.startswith("3ml") else {}
    cfg = ModelConfig(num_layers=LAYERS.get(method, L), hidden_size=H, num_attention_heads=NH, seq_length=64, vocab_size=vocab,
                      hidden_dropout=0.0, attention_dropout=0.0, transformer_impl="local", **dec)
    par = ParallelConfig(recompute_granularity=recompute)
    prec = PrecisionConfig(bf16=True, fp8_format=fp8_format, fp8_recipe=recipe, fp8_compile=compile)
    return build_model(cfg, par, build_transformer_config(cfg, par, prec), wrap_ddp=False)[0]


def step(model, method, tok, batch, device="cpu"):
    """Loss, fp32 gradients and the number of aten::_scaled_mm calls of one forward + backward."""
    from megatron_effmlm.plans import get_policy
    from precision_helpers import batch_for

    model.zero_grad()
    opts = {"3ml-cross": dict(decoder_layers=2, decoder_type="cross"), "token-drop": dict(td_keep_ratio=0.4)}
    policy = get_policy(method.replace("-cross", ""), tokenizer=tok, num_layers=LAYERS.get(method, L), seed=3, **opts.get(method, {}))
    if hasattr(policy, "importance"):  # a learned-looking table: kept sets that are not trivial
        policy.importance = torch.rand(tok.vocab_size, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 20
        policy._pin()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(**policy.model_inputs(batch_for(batch, tok, method, device), 0))
        total, n, _ = policy.loss(out)
        (total / n).backward()
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_mm")
    grads = {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}
    return float(total / n), grads, calls


def test_fp8_status_names_the_provider():
    from megatron_effmlm.model.backends import fp8_status

    assert fp8_status() == ("torchao", TORCHAO)
    assert fp8_status("local", "e4m3", "rowwise") == ("torchao", TORCHAO)
    assert fp8_status("transformer_engine") == (None, "Transformer Engine: no CUDA device")


@pytest.mark.parametrize("method,fmt,recipe", [
    ("vanilla", "hybrid", "tensorwise"), ("vanilla", "e4m3", "tensorwise"), ("vanilla", "e4m3", "rowwise"),
    ("3ml-cross", "hybrid", "tensorwise"), ("token-drop", "hybrid", "tensorwise"),
])
def test_fp8_step_tracks_bf16(mcore_single, demo_batch, demo_tokenizer, method, fmt, recipe):
    """Every GEMM of the transformer layers runs as torch._scaled_mm (3 per linear: forward,
    input gradient, weight gradient), and the loss and every gradient follow the bf16 model's.
    Tolerances: e4m3 keeps 3 mantissa bits (relative rounding up to 2^-4 per element, e5m2
    gradients 2^-3), which averages down over each GEMM's inner dimension to about 2-4% per
    output (measured on random bf16 data); the loss (mean cross-entropy, near ln V at this
    initialisation) moves far less: 0.2% on it (measured: 2e-4) and a gradient cosine of 0.97
    per tensor (measured: 0.98 and above; a transposed or mis-scaled GEMM gives far less)."""
    from megatron_effmlm.model.fp8_torchao import Float8ForwardImpl, transformer_linears

    tok = demo_tokenizer
    ref = fp8_model(tok.vocab_size, method)
    fp8 = fp8_model(tok.vocab_size, method, fmt, recipe)
    fp8.load_state_dict(ref.state_dict())
    linears = [m for _, m in transformer_linears(fp8)]
    layers = LAYERS.get(method, L) + (2 if method.startswith("3ml") else 0)
    assert len(linears) == 4 * layers + (6 if method == "3ml-cross" else 0)  # + cross-attention's q, kv, proj
    assert all(isinstance(m._forward_impl, Float8ForwardImpl) for m in linears)
    assert not isinstance(fp8.output_layer._forward_impl, Float8ForwardImpl)  # the LM head stays bf16
    assert fp8.live_token_multiple == 16
    l1, g1, c1 = step(ref, method, tok, demo_batch)
    l2, g2, c2 = step(fp8, method, tok, demo_batch)
    assert (c1, c2) == (0, 3 * len(linears))
    assert abs(l2 - l1) <= 2e-3 * abs(l1), (l1, l2)
    assert g1.keys() == g2.keys()
    for k in g1:
        assert g2[k].abs().max() > 0, k  # gradients reach every parameter
        cos = torch.nn.functional.cosine_similarity(g1[k].flatten(), g2[k].flatten(), dim=0).item()
        assert cos >= 0.97, (k, cos)


def test_fp8_with_full_recompute_equals_fp8(mcore_single, demo_batch, demo_tokenizer):
    """Dynamic scaling keeps no state, so recomputing a layer in backward repeats its float8
    GEMMs exactly: the same loss and gradients, bit for bit."""
    tok = demo_tokenizer
    plain = fp8_model(tok.vocab_size, fp8_format="hybrid")
    recomputed = fp8_model(tok.vocab_size, fp8_format="hybrid", recompute="full")
    recomputed.load_state_dict(plain.state_dict())
    recomputed.train()
    l1, g1, _ = step(plain, "vanilla", tok, demo_batch)
    l2, g2, c2 = step(recomputed, "vanilla", tok, demo_batch)
    assert c2 == 3 * 4 * L + 4 * L  # each layer's forward GEMMs once more
    assert l1 == l2
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_fp8_compiled_equals_eager(mcore_single, demo_batch, demo_tokenizer):
    """--fp8-compile: the same float8 casts and GEMMs under torch.compile (fused), so the same
    loss and gradients as eager, bit for bit on the CPU (about a minute: inductor compiles)."""
    tok = demo_tokenizer
    eager = fp8_model(tok.vocab_size, fp8_format="hybrid")
    compiled = fp8_model(tok.vocab_size, fp8_format="hybrid", compile=True)
    compiled.load_state_dict(eager.state_dict())
    l1, g1, _ = step(eager, "vanilla", tok, demo_batch)
    l2, g2, c2 = step(compiled, "vanilla", tok, demo_batch)
    assert c2 > 0  # the compiled graph still calls torch._scaled_mm
    assert l1 == l2
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@needs_cpu_bf16
def test_fp8_trainer_tp2_follows_one_process(tmp_path, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    """The trainer with --fp8-format on one process, TP=2 and TP=2 + sequence parallel (torchrun,
    gloo) from one checkpoint: each TP rank scales its own shard of every weight and
    activation (tensorwise amax per shard), so TP=2 is not bit-equal to one process; its
    losses stay within 0.2% and its gradient norms within 2% (measured: 3e-4 and 0.5%), as do
    FP8's against one bf16 process from the same start over three steps."""
    base = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"), **{
        "--global-batch-size": "2", "--bf16": ""})
    fp8 = ["--fp8-format", "hybrid"]
    init = str(tmp_path / "init")
    one = run_scenarios(tmp_path, 1, {"bf16": {"args": base, "steps": 3, "save_init": init},
                                      "fp8": {"args": base + fp8 + ["--load", init], "steps": 3}}, "one")
    tp = run_scenarios(tmp_path, 2, {
        "tp2": {"args": base + fp8 + ["--tensor-model-parallel-size", "2", "--load", init], "steps": 3},
        "tp2sp": {"args": base + fp8 + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--load", init],
                  "steps": 3}}, "tp")
    # FP8 changed the numbers (the float8 path ran), by little
    assert one["fp8"]["steps"][0]["grad_norm"] != one["bf16"]["steps"][0]["grad_norm"]
    for a, b in zip(one["fp8"]["steps"], one["bf16"]["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2), (a, b)
    for layout in ("tp2", "tp2sp"):
        for a, b in zip(tp[layout]["steps"], one["fp8"]["steps"]):
            assert a["loss"] == pytest.approx(b["loss"], rel=2e-3), (layout, a, b)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2), (layout, a, b)
            assert a["lr"] == b["lr"]


def _config_error(flags):
    from megatron_effmlm.arguments import parse_args
    from megatron_effmlm.config import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_args(["--data-path", "x", "--tokenizer-dir", "y", *flags])
    return str(e.value)


@pytest.mark.parametrize("flags,message", [
    (["--fp8-format", "hybrid"], "--fp8-format hybrid needs --bf16 or --fp16 (FP8 covers the GEMMs only)"),
    (["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "rowwise"],
     "--fp8-recipe rowwise is torchao's rowwise recipe, e4m3 for activations, weights and gradients: "
     "use --fp8-format e4m3"),
    (["--bf16", "--fp8-format", "e4m3", "--fp8-recipe", "mxfp8"],
     "--fp8-recipe mxfp8 needs Transformer Engine; torchao (FP8 with the local layer spec) takes tensorwise or rowwise"),
    (["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "delayed"],
     "--fp8-recipe delayed needs Transformer Engine; torchao (FP8 with the local layer spec) takes tensorwise or rowwise"),
    (["--bf16", "--fp8-compile"], "--fp8-compile needs --fp8-format"),
    (["--bf16", "--fp8-format", "hybrid", "--fp8-margin", "1"],
     f"--fp8-margin is for Transformer Engine's delayed scaling; torchao (FP8 here: {TORCHAO}) scales each tensor "
     "from its own current amax"),
])
def test_fp8_flags_errors_name_the_flag(flags, message):
    assert _config_error(flags) == message


@needs_cpu_bf16
def test_fp8_flags_resolve_the_provider_default_recipe():
    from megatron_effmlm.arguments import parse_args

    cfg = parse_args(["--data-path", "x", "--tokenizer-dir", "y", "--bf16", "--fp8-format", "hybrid"])
    assert (cfg.precision.fp8_format, cfg.precision.fp8_recipe) == ("hybrid", "tensorwise")


def test_fp8_without_torchao_is_one_error_line(tmp_path):
    """A machine without torchao (and without TE): --fp8-format is one `error:` line that says
    what is missing. torchao is made unimportable in that process the way Python documents
    (sys.modules entry None), as on a machine where it is not installed."""
    script = ("import sys; sys.modules['torchao'] = None\n"
              "sys.argv = ['pretrain_effmlm.py', '--data-path', 'x', '--tokenizer-dir', 'y', '--bf16', "
              "'--fp8-format', 'hybrid']\n"
              "import runpy; runpy.run_path('pretrain_effmlm.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONWARNINGS="ignore"))
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert lines == ["error: --fp8-format hybrid needs Transformer Engine on an FP8-capable GPU or torchao with "
                     "float8 GEMMs: Transformer Engine: no CUDA device; torchao: torchao is not importable "
                     "(ModuleNotFoundError: import of torchao halted; None in sys.modules)"], r.stderr[-2000:]
