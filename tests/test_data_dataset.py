"""PackedMLMDataset / BERT binary-head dataset through BlendedMegatronDatasetBuilder."""

import os
import shutil

import numpy
import pytest
import torch

from megatron_effmlm.data.dataset import (
    BERTSentenceOrderDataset,
    MLMDatasetConfig,
    PackedMLMDataset,
    build_train_valid_test_datasets,
)
from megatron_effmlm.data.errors import DataError

T = 128
KEYS = {"text", "types", "labels", "is_random", "padding_mask", "loss_mask", "truncated"}


@pytest.fixture(scope="module")
def one_epoch(demo_data_prefix, demo_tokenizer, tmp_path_factory):
    train, valid, test = build_train_valid_test_datasets(
        [demo_data_prefix], tokenizer=demo_tokenizer, seq_length=T, split="98,2,0", seed=1234,
        cache_dir=str(tmp_path_factory.mktemp("cache")))
    return train, valid, test


def _check_sample(s, tok, length=T):
    assert set(s) - {"dataset_id"} == KEYS  # a blend adds the dataset id
    for key in KEYS - {"is_random", "truncated"}:
        assert s[key].shape == (length,) and s[key].dtype == numpy.int64, key
    n = int(s["padding_mask"].sum())
    assert (s["padding_mask"][:n] == 1).all() and (s["padding_mask"][n:] == 0).all()
    assert (s["text"][n:] == tok.pad).all() and (s["labels"][n:] == -1).all() and (s["loss_mask"][n:] == 0).all()
    assert s["text"][0] == tok.cls and s["text"][n - 1] == tok.sep
    pred = s["loss_mask"] == 1
    assert pred.sum() >= 1 and (s["labels"][~pred] == -1).all() and (s["labels"][pred] >= 5).all()
    return n


def test_packing_keeps_every_token_in_order(one_epoch, demo_data_prefix, demo_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    train, valid, test = one_epoch
    tok = demo_tokenizer
    assert isinstance(train, PackedMLMDataset) and test is None
    assert len(train) == train.samples_per_epoch  # no num_samples: one epoch
    raw = IndexedDataset(demo_data_prefix)
    docs = raw.document_indices
    for ds in (train, valid):
        first_doc, last_doc = int(ds.indices[0]), int(ds.indices[-1])
        expected = numpy.concatenate(raw[int(docs[first_doc]):int(docs[last_doc + 1])])
        bodies, seps, opens_doc = [], 0, 0
        doc_starts = set(docs[first_doc:last_doc + 1].tolist())
        for k in range(ds.samples_per_epoch):
            tokens, _ = ds.packed_tokens(k)
            assert len(tokens) <= T and tokens[0] == tok.cls and tokens[-1] == tok.sep
            body = tokens[1:-1]
            seps += int((body == tok.sep).sum())
            bodies.append(body[body != tok.sep])
            first_seq, offset = ds.sample_index[k][:2]
            opens_doc += int(offset == 0 and first_seq in doc_starts)
        assert numpy.array_equal(numpy.concatenate(bodies), expected)  # nothing dropped or reordered
        # One separator between consecutive documents, except where a sample opens a document.
        assert seps == len(ds.indices) - opens_doc
        fill = numpy.mean([len(ds.packed_tokens(k)[0]) for k in range(ds.samples_per_epoch)]) / T
        assert fill > 0.8  # full sentences pack densely


def test_samples_format_and_determinism(one_epoch, demo_data_prefix, demo_tokenizer, tmp_path):
    train, _, _ = one_epoch
    order = [7, 3, 0, 7, len(train) - 1, 3]
    first = {i: train[i] for i in order}
    for i in order:
        _check_sample(first[i], demo_tokenizer)
        again = train[i]
        assert all(numpy.array_equal(first[i][k], again[k]) for k in KEYS)
    # A fresh build with the same seed (from the cache) gives the same samples, in any order.
    rebuilt, _, _ = build_train_valid_test_datasets(
        [demo_data_prefix], tokenizer=demo_tokenizer, seq_length=T, split="98,2,0", seed=1234,
        cache_dir=train.config.path_to_cache)
    assert numpy.array_equal(rebuilt.shuffle_index, train.shuffle_index)
    for i in reversed(order):
        assert all(numpy.array_equal(rebuilt[i][k], first[i][k]) for k in KEYS)
    other, _, _ = build_train_valid_test_datasets(
        [demo_data_prefix], tokenizer=demo_tokenizer, seq_length=T, split="98,2,0", seed=99, cache_dir=str(tmp_path))
    assert not numpy.array_equal(other.shuffle_index, train.shuffle_index)
    assert not all(numpy.array_equal(other[i]["text"], first[i]["text"]) for i in (0, 3, 7))
    # The masks depend on the seed, not only the order: same sample, other seed, other masks.
    k = int(train.shuffle_index[0])
    j = int(numpy.flatnonzero(numpy.asarray(other.shuffle_index) == k)[0])
    assert numpy.array_equal(other.packed_tokens(k)[0], train.packed_tokens(k)[0])
    assert not numpy.array_equal(other[j]["loss_mask"], first[0]["loss_mask"])


def test_num_samples_spans_epochs(demo_data_prefix, demo_tokenizer, tmp_path):
    n = 16000
    train, valid, test = build_train_valid_test_datasets(
        [demo_data_prefix], tokenizer=demo_tokenizer, seq_length=T, split="98,2,0", train_samples=n, valid_samples=7,
        test_samples=0, cache_dir=str(tmp_path))
    per = train.samples_per_epoch
    assert len(train) == n and 2 * per < n < 3 * per and len(valid) == 7
    shuffle = numpy.asarray(train.shuffle_index)
    for e in range(2):  # each full epoch is a permutation of the epoch's samples
        assert sorted(shuffle[e * per:(e + 1) * per]) == list(range(per))
    assert len(set(shuffle[2 * per:])) == n - 2 * per
    assert not numpy.array_equal(shuffle[:per], shuffle[per:2 * per])
    # Dynamic masking: the same packed sample in two epochs gets different masks.
    k = shuffle[0]
    i2 = per + int(numpy.flatnonzero(shuffle[per:2 * per] == k)[0])
    assert not numpy.array_equal(train[0]["loss_mask"], train[i2]["loss_mask"])
    assert numpy.array_equal(train[0]["labels"] >= 0, train[0]["loss_mask"] == 1)


def _write_indexed(prefix, documents):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for doc in documents:
        builder.add_document(numpy.concatenate(doc), [len(s) for s in doc])
    builder.finalize(f"{prefix}.idx")


def test_long_sentence_is_cut_not_dropped(tmp_path, demo_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    tok = demo_tokenizer
    a, b, c, d = (numpy.arange(s, s + n) for s, n in ((10, 10), (100, 300), (500, 5), (600, 7)))
    prefix = str(tmp_path / "synthetic")
    _write_indexed(prefix, [[a], [b, c], [d]])
    config = MLMDatasetConfig(random_seed=1, sequence_length=66, blend=([prefix], None), split="1,0,0",
                              tokenizer=tok, path_to_cache=str(tmp_path / "cache"))
    ds = PackedMLMDataset(IndexedDataset(prefix), prefix, numpy.arange(3, dtype=numpy.int32), None,
                          Split.train, config)
    packed = [ds.packed_tokens(k) for k in range(ds.samples_per_epoch)]
    cls, sep = [tok.cls], [tok.sep]
    assert [p[0].tolist() for p in packed] == [
        cls + a.tolist() + sep,
        cls + b[0:64].tolist() + sep,
        cls + b[64:128].tolist() + sep,
        cls + b[128:192].tolist() + sep,
        cls + b[192:256].tolist() + sep,
        cls + b[256:].tolist() + c.tolist() + sep + d.tolist() + sep,
    ]
    assert [p[1] for p in packed] == [False, True, True, True, True, True]
    assert [ds[i]["truncated"] for i in range(len(ds))] == [int(packed[k][1]) for k in ds.shuffle_index]


def test_blend_proportions(demo_data_prefix, demo_tokenizer, tmp_path):
    other = str(tmp_path / "copy_text_sentence")
    for ext in (".bin", ".idx"):
        shutil.copy(demo_data_prefix + ext, other + ext)
    n = 3000
    train, valid, _ = build_train_valid_test_datasets(
        ["0.7", demo_data_prefix, "0.3", other], tokenizer=demo_tokenizer, seq_length=T, split="98,2,0", train_samples=n,
        valid_samples=100, test_samples=0, cache_dir=str(tmp_path / "cache"))
    ids = numpy.array([train[i]["dataset_id"] for i in range(n)])
    assert len(train) == n
    assert abs((ids == 0).mean() - 0.7) < 0.002 and abs((ids == 1).mean() - 0.3) < 0.002
    for start in (0, 1000, 2900):  # the proportions hold locally too, not only overall
        assert abs((ids[start:start + 100] == 0).mean() - 0.7) <= 0.02
    _check_sample(train[5], demo_tokenizer)
    assert len(valid) == 100


def test_binary_head_uses_megatron_bert_dataset(demo_data_prefix, demo_tokenizer, tmp_path):
    tok = demo_tokenizer
    train, _, _ = build_train_valid_test_datasets(
        [demo_data_prefix], tokenizer=tok, seq_length=T, split="98,2,0", train_samples=300, valid_samples=10, test_samples=0,
        binary_head=True, cache_dir=str(tmp_path))
    assert isinstance(train, BERTSentenceOrderDataset) and len(train) >= 300
    flags, kinds = [], numpy.zeros(3)
    for i in range(60):
        s = train[i]
        n = _check_sample(s, tok)
        # megatron-core reads our 80/10/10 rule one position at a time; the labels hold the originals
        at = s["loss_mask"] == 1
        new, old = s["text"][at], s["labels"][at]
        kinds += [(new == tok.mask).sum(), ((new != tok.mask) & (new != old)).sum(), (new == old).sum()]
        types = s["types"][:n]
        seg_b = int(numpy.argmax(types == 1))
        assert seg_b > 1 and (types[:seg_b] == 0).all() and (types[seg_b:] == 1).all() and (s["types"][n:] == 0).all()
        assert s["text"][seg_b - 1] == tok.sep
        assert not numpy.isin(s["labels"][s["loss_mask"] == 1], [tok.cls, tok.sep, tok.pad]).any()
        flags.append(s["is_random"])
    assert set(flags) == {0, 1}
    shares = kinds / kinds.sum()
    assert kinds.sum() > 1000 and abs(shares[0] - 0.8) < 0.04 and abs(shares[1] - 0.1) < 0.03, shares


def test_builds_inside_torch_distributed(demo_data_prefix, demo_tokenizer, tmp_path):
    own = not torch.distributed.is_initialized()  # another test module may have started one
    if own:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train, _, _ = build_train_valid_test_datasets(
            ["1", demo_data_prefix], tokenizer=demo_tokenizer, seq_length=T, split="98,2,0", train_samples=50, valid_samples=5,
            test_samples=0, cache_dir=str(tmp_path / "cache"), binary_head=False)
        assert len(train) == 50 and torch.distributed.is_initialized()
        _check_sample(train[0], demo_tokenizer)
    finally:
        if own:
            torch.distributed.destroy_process_group()
    assert any(f.endswith("BlendedDataset-train-dataset_index.npy") for f in os.listdir(tmp_path / "cache"))


def test_bad_inputs(demo_data_prefix, demo_tokenizer, tmp_path):
    def build(path, **kw):
        args = dict(split="98,2,0", train_samples=10, valid_samples=2, test_samples=0, cache_dir=str(tmp_path))
        args.update(kw)
        return build_train_valid_test_datasets(path, tokenizer=demo_tokenizer, seq_length=T, **args)

    missing = str(tmp_path / "nope_text_sentence")
    with pytest.raises(DataError) as err:
        build([missing])
    assert str(err.value) == (f"--data-path: no indexed dataset at prefix {missing}: {missing}.bin and "
                              f"{missing}.idx do not exist (give the prefix without .bin/.idx)")
    with pytest.raises(DataError, match=f"^--data-path: no indexed dataset at prefix {demo_data_prefix}.bin: "):
        build([demo_data_prefix + ".bin"])

    truncated = str(tmp_path / "trunc")
    shutil.copy(demo_data_prefix + ".bin", truncated + ".bin")
    idx = open(demo_data_prefix + ".idx", "rb").read()
    open(truncated + ".idx", "wb").write(idx[: len(idx) // 2])
    with pytest.raises(DataError, match=rf"^{truncated}\.idx: truncated index file: {len(idx) // 2} bytes, but its header promises"):
        build([truncated])
    open(truncated + ".idx", "wb").write(b"garbage" + idx[7:])
    with pytest.raises(DataError, match=rf"^{truncated}\.idx: corrupt or truncated index file \(bad header"):
        build([truncated])
    shutil.copy(demo_data_prefix + ".idx", truncated + ".idx")
    open(truncated + ".bin", "wb").write(open(demo_data_prefix + ".bin", "rb").read()[:1000])
    with pytest.raises(DataError, match=rf"^{truncated}\.bin: truncated data file: 1000 bytes, its index needs"):
        build([truncated])

    p = demo_data_prefix
    cases = {
        ("0.7", p, "0.3"): "--data-path: odd number of entries (3) in a weighted blend",
        ("-1", p, "1", p): "--data-path: blend weight '-1' must be a positive number",
        ("0", p): "--data-path: blend weight '0' must be a positive number",
        ("0.7", p, "x", p): "--data-path: blend weight 'x' is not a number",
        ("0.7", "0.3"): "--data-path: '0.3' is where a dataset prefix should be",
    }
    for path, message in cases.items():
        with pytest.raises(DataError) as err:
            build(list(path))
        assert str(err.value).startswith(message), err.value
    with pytest.raises(DataError, match=r"^--split 'a,b': expected up to three comma-separated numbers"):
        build([p], split="a,b")
    with pytest.raises(DataError, match=r"^--data-path with blend weights needs the number of samples"):
        build(["0.5", p, "0.5", p], train_samples=None)
    with pytest.raises(DataError, match=r"the test split \(0 documents for split '949,50,1'\) has no tokens, "
                                         r"but 10 samples were requested"):
        build([p], split="949,50,1", test_samples=10)


RANK_SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
import numpy, torch
from megatron_effmlm.data.dataset import build_train_valid_test_datasets
from megatron_effmlm.data.tokenizer import EffMLMTokenizer
rank, store, prefix, tok_dir, cache, out = int(sys.argv[2]), *sys.argv[3:]
torch.distributed.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
train, valid, _ = build_train_valid_test_datasets(
    ["0.6", prefix, "0.4", prefix], tokenizer=EffMLMTokenizer.from_dir(tok_dir), seq_length=128, split="98,2,0",
    train_samples=200, valid_samples=20, test_samples=0, cache_dir=cache)
torch.distributed.destroy_process_group()
json.dump({"len": len(train), "text": [train[i]["text"].tolist() for i in (0, 99, 199)]}, open(out, "w"))
"""


def test_two_ranks_build_the_same_datasets(repo_root, demo_data_prefix, demo_tokenizer_dir, tmp_path):
    """Rank 0 builds and caches the indices, rank 1 loads them; both see the same samples."""
    import json
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = [
        subprocess.Popen([sys.executable, str(script), repo_root, str(rank), str(tmp_path / "store"),
                          demo_data_prefix, demo_tokenizer_dir, str(tmp_path / "cache"), str(tmp_path / f"{rank}.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
    results = [json.load(open(tmp_path / f"{rank}.json")) for rank in range(2)]
    assert results[0] == results[1] and results[0]["len"] == 200
