"""No host reads of tensor values on a training step's path (plan, engine, model forward, loss,
backward): every read of a tensor's value by the host (`.item()`, `int(t)`, `bool(t)`,
`.tolist()`, `nonzero`, indexing with a boolean mask) would stall a GPU's queue. Counted on the
CPU by intercepting them during one forward + backward of every method;
only the documented inherent reads may remain (INHERENT)."""

import collections
import os
import sys
import traceback

import pytest
import torch

from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_effmlm.model.builder import build_transformer_config, decoder_spec
from megatron_effmlm.model.mlm_model import MLMModel
from megatron_effmlm.model.specs import get_layer_spec
from megatron_effmlm.plans import get_policy

L = 4
CHUNK = 16
TENSOR_READS = ("item", "tolist", "__int__", "__bool__", "__index__", "__float__", "nonzero", "argwhere",
                "masked_select")
# and torch.tensor: a host number copied to the device (a blocking copy syncs a GPU)
TORCH_READS = ("nonzero", "argwhere", "masked_select", "tensor")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


class _BoolGetitem(torch.overrides.TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and _is_bool_index(args[1]):
            self.counter.reads[self.counter._where("__getitem__")] += 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """Counts each host read of a tensor value as 'file:function:read' of the first caller frame
    outside torch (ours or megatron-core's), by wrapping the reading methods of torch.Tensor and
    torch's functions while active. Wrapping the class, not a TorchFunctionMode: a mode is not
    active inside the autograd engine, and backward (recomputed checkpoints, custom Functions)
    must be counted too."""

    def __init__(self):
        self.reads = collections.Counter()
        self._saved = []

    def _wrap(self, owner, name, counts=lambda args: True):
        orig = getattr(owner, name)
        own = name in vars(owner)  # else inherited (torch._C.TensorBase): restore by deleting ours

        def wrapper(*args, **kwargs):
            # a TorchFunctionMode (compat/cpu.py's) re-dispatches a call already counted
            if sys._getframe(1).f_code.co_name != "__torch_function__" and counts(args):
                self.reads[self._where(name)] += 1
            return orig(*args, **kwargs)

        self._saved.append((owner, name, orig, own))
        setattr(owner, name, wrapper)

    def __enter__(self):
        for name in TENSOR_READS:
            self._wrap(torch.Tensor, name)
        for name in TORCH_READS:
            self._wrap(torch, name)
        # assigning through a boolean mask: a nonzero
        self._wrap(torch.Tensor, "__setitem__", lambda args: _is_bool_index(args[1]))
        # reading through one: a TorchFunctionMode (forward only), because a __getitem__ set on
        # the class and removed again leaves it a sequence type to torch.tensor()
        self._getitem = _BoolGetitem(self)
        self._getitem.__enter__()
        return self

    def __exit__(self, *exc):
        self._getitem.__exit__(*exc)
        for owner, name, orig, own in reversed(self._saved):
            if own:
                setattr(owner, name, orig)
            else:
                delattr(owner, name)
        self._saved.clear()

    @staticmethod
    def _where(name):
        for frame in reversed(traceback.extract_stack()[:-2]):  # less _where and the wrapper
            if f"{os.sep}torch{os.sep}" not in frame.filename:
                path = frame.filename.split("site-packages" + os.sep)[-1]  # megatron-core's
                if path.startswith(REPO):
                    path = os.path.relpath(path, REPO)
                return f"{path}:{frame.name}:{name}"
        return f"torch:{name}"


def make_model(vocab, decoder_layers=0, decoder_type="self", lm_head_chunk_size=0, attention="local"):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=L, hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=vocab,
                      hidden_dropout=0.0, attention_dropout=0.0, decoder_layers=decoder_layers,
                      decoder_type=decoder_type, transformer_impl="local", attention_backend=attention)
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig())
    return MLMModel(tc, get_layer_spec("local", L, attention)[0], cfg.padded_vocab_size(), 64,
                    decoder_layers=decoder_layers, decoder_layer_spec=decoder_spec(cfg) if decoder_layers else None,
                    lm_head_chunk_size=lm_head_chunk_size, packed_attention=attention == "varlen")


# method -> (policy name, policy options, model options, step)
METHODS = {
    "vanilla": ("vanilla", {}, {}, 0),
    "vanilla-head-chunks": ("vanilla", {}, dict(lm_head_chunk_size=CHUNK), 0),  # --lm-head-chunk-size
    "3ml": ("3ml", dict(decoder_layers=2), dict(decoder_layers=2), 0),
    "3ml-cross": ("3ml", dict(decoder_layers=2, decoder_type="cross"), dict(decoder_layers=2, decoder_type="cross"), 0),
    "token-drop": ("token-drop", {}, {}, 0),
    "sctd": ("sctd", dict(sctd_interval=2), {}, 1),
    "sctd-consistency": ("sctd", dict(sctd_interval=2), {}, 0),
    "random-ltd": ("random-ltd", dict(ltd_start=16, ltd_steps=8), {}, 0),
    # packed attention (--attention-backend varlen): segment bounds built on the device
    "3ml-cross-packed": ("3ml", dict(decoder_layers=2, decoder_type="cross"),
                         dict(decoder_layers=2, decoder_type="cross", attention="varlen"), 0),
    "token-drop-packed": ("token-drop", {}, dict(attention="varlen"), 0),
    "random-ltd-packed": ("random-ltd", dict(ltd_start=16, ltd_steps=8), dict(attention="varlen"), 0),
}


def count_reads(method, batch, tok):
    name, popts, mopts, step = METHODS[method]
    if name == "3ml":
        batch = {k: v.clone() for k, v in batch.items()}
        batch["text"][batch["loss_mask"].bool()] = tok.mask
    model = make_model(tok.vocab_size, **mopts)
    policy = get_policy(name, tokenizer=tok, num_layers=L, **popts)
    mode = HostReads()
    with mode:
        out = model(**policy.model_inputs(batch, step))
        total, n, _ = policy.loss(out)
        (total / n).backward()
    return mode.reads


MCORE_CE = "megatron/core/tensor_parallel/cross_entropy.py"


def inherent(method, m):
    """The reads that remain, per method (see each for why):
    - the LM head's `nonzero` of the loss mask: the head runs on the m predicted rows only, and m
      is the batch's (one per head pass; ScTD's consistency step has two passes);
    - megatron-core's vocab_parallel_cross_entropy assigns through a boolean mask twice
      (`masked_target[target_mask] = 0`, `predicted_logits[target_mask] = 0.0`), which torch's
      index_put_ turns into a nonzero: megatron-core's code, used as is (with the head in chunks,
      twice per chunk in forward and twice more in its recompute);
    - 3ML: LiveSet.from_mask's maximum over rows of the unmasked (encoder) tokens and, for
      3ML-cross, of the predicted (decoder) tokens: no bound below T follows from the batch
      shape, and padding 3ML's encoder to T would give up its saving.
    Token dropping, ScTD and random-LTD pad their kept sets to a width from T and the ratio
    (plans.base.static_width): no read.
    Packed attention: the bounds are made on the device (no read); only the CPU's stand-in for
    the GPU kernel (reference_varlen_attn) reads them, twice per attention call: varlen_attn
    takes them on the device."""
    passes = 2 if method == "sctd-consistency" else 1
    ce_calls = 2 * -(-m // CHUNK) if method == "vanilla-head-chunks" else passes
    want = {"megatron_effmlm/model/mlm_model.py:mlm_head:nonzero": passes,
            f"{MCORE_CE}:calculate_predicted_logits:__setitem__": 2 * ce_calls}
    if method.startswith("3ml"):
        want["megatron_effmlm/model/plan.py:from_mask:__int__"] = 2 if method.startswith("3ml-cross") else 1
    if method.endswith("-packed"):
        calls = L + (2 * 2 if method.startswith("3ml-cross") else 0)  # + the decoder's self and cross attention
        want["megatron_effmlm/model/packed_attention.py:reference_varlen_attn:tolist"] = 2 * calls
    return want


@pytest.mark.parametrize("method", list(METHODS))
def test_step_host_reads_are_the_inherent_ones(demo_batch, demo_tokenizer, method):
    m = int(demo_batch["loss_mask"].sum())
    assert m > CHUNK
    assert dict(count_reads(method, demo_batch, demo_tokenizer)) == inherent(method, m)


def test_kept_bound_is_torchs_largest_k():
    """token dropping's static width is exactly the largest per-row k torch computes (float32
    product, round half to even, at least 1) over every real-token count up to T."""
    from megatron_effmlm.plans.token_drop import kept_bound

    n = torch.arange(0, 1025)
    for ratio in (0.5, 0.3, 0.7, 0.15, 1 / 3, 0.999, 1.0):
        k = (n.float() * ratio).round().clamp(min=1).long()
        for T in (1, 2, 3, 63, 64, 127, 128, 511, 512, 1023, 1024):
            assert kept_bound(T, ratio) == int(k[: T + 1].max()), (T, ratio)


def test_static_width_pads_the_data_dependent_live_set(demo_batch, demo_tokenizer):
    """The kept sets of token dropping and random-LTD: the same valid slots as the batch's own
    maximum width, then only invalid slots (position T), at a width from T and the ratio."""
    from megatron_effmlm.model.plan import LiveSet, _mask_of
    from megatron_effmlm.plans.token_drop import kept_bound

    batch = {k: v.clone() for k, v in demo_batch.items()}
    batch["padding_mask"][:, 50:] = 0  # every row shorter than T: the maximum count is below the bound
    T = batch["text"].shape[1]
    real = batch["padding_mask"].bool()
    policies = {"token-drop": (get_policy("token-drop", tokenizer=demo_tokenizer, num_layers=L), kept_bound(T, 0.5)),
                "random-ltd": (get_policy("random-ltd", tokenizer=demo_tokenizer, num_layers=L, ltd_start=56), 56)}
    for name, (policy, width) in policies.items():
        live = policy.kept(batch) if name == "token-drop" else policy.sample(batch["text"], real, 56, 0, 1)
        exact = LiveSet.from_mask(_mask_of(live, real))  # the rows' maximum count
        assert live.n == width > exact.n, name
        assert torch.equal(live.idx[:, :exact.n], exact.idx) and torch.equal(live.valid[:, :exact.n], exact.valid)
        assert (live.idx[:, exact.n:] == T).all() and not live.valid[:, exact.n:].any(), name
