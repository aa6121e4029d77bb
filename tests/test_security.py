"""Security and the user's files: no file of a checkpoint or model folder can run code, at any
entry point (pretrain_effmlm.py --load, tools/export_hf.py), a broken HF folder is a clear
error, and no tool deletes or writes over what it did not write.

The payload is harmless: unpickling it would `touch` a marker file."""

import dataclasses
import io
import json
import os
import pickle
import shutil
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO_ROOT, tiny_model_args

PLACES = [".metadata", "common.pt", "shard"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def small_ck(tmp_path_factory, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    """One process, 2 steps, saved at iterations 1 and 2."""
    tmp = tmp_path_factory.mktemp("security")
    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"),
                           **{"--train-iters": 2, "--save-interval": 1})
    ck = str(tmp / "ck")
    r = subprocess.run([PYTHON, "pretrain_effmlm.py", *args, "--save", ck], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    return ck, args


def plant(iter_dir: str, where: str, marker: str) -> str:
    """Put the payload into one file of checkpoint `iter_dir`; returns the file's path."""
    target = os.path.join(iter_dir, where)
    if where == ".metadata":  # torch DCP reads this one with plain pickle
        open(target, "wb").write(pickle.dumps(_Evil(marker), protocol=2))
    elif where == "common.pt":
        torch.save({"iteration": 2, "payload": _Evil(marker)}, target)
    else:  # a non-tensor item of a .distcp shard (the RNG state): appended, and .metadata points at it
        meta_path = os.path.join(iter_dir, ".metadata")
        meta = pickle.load(open(meta_path, "rb"))
        key = next(k for k in meta.storage_data if k.fqn.startswith("rng_state"))
        info = meta.storage_data[key]
        target = os.path.join(iter_dir, info.relative_path)
        buf = io.BytesIO()
        torch.save({"torch": _Evil(marker)}, buf)
        offset = os.path.getsize(target)
        with open(target, "ab") as f:
            f.write(buf.getvalue())
        meta.storage_data[key] = dataclasses.replace(info, offset=offset, length=len(buf.getvalue()))
        pickle.dump(meta, open(meta_path, "wb"))
    return target


def _one_error(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_crafted_checkpoint_never_runs_code_on_load(tmp_path, small_ck):
    """Every file torch DCP / dist_checkpointing unpickles, through pretrain_effmlm.py --load."""
    ck, args = small_ck
    cases, targets = {}, {}
    for where in PLACES:
        root = str(tmp_path / where.strip("."))
        shutil.copytree(ck, root)
        targets[where] = plant(os.path.join(root, "iter_0000002"), where, str(tmp_path / f"PWNED_{where}"))
        cases[where] = [*args, "--load", root, "--train-iters", "3"]
    r = subprocess.run([PYTHON, "tests/cli_error_runner.py", "-", "-"], input=json.dumps(cases), cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    for where in PLACES:
        code, err = got[where]
        assert not os.path.exists(tmp_path / f"PWNED_{where}"), where
        assert code == 2, err[-3000:]
        assert _one_error(err).startswith(f"error: refusing to load {targets[where]}: it would unpickle "), where


@pytest.mark.parametrize("where", PLACES)
def test_crafted_checkpoint_never_runs_code_on_export(tmp_path, small_ck, where):
    ck, _ = small_ck
    root, marker = str(tmp_path / "ck"), str(tmp_path / "PWNED")
    shutil.copytree(ck, root)
    target = plant(os.path.join(root, "iter_0000002"), where, marker)
    r = subprocess.run([PYTHON, "tools/export_hf.py", "--checkpoint", root, "--output-dir", str(tmp_path / "hf")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert not os.path.exists(marker)
    assert r.returncode == 2, r.stderr[-3000:]
    assert _one_error(r.stderr).startswith(f"error: refusing to load {target}: it would unpickle ")
    assert not os.path.exists(tmp_path / "hf")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, small_ck):
    out = str(tmp_path_factory.mktemp("security_hf") / "hf")
    r = subprocess.run([PYTHON, "tools/export_hf.py", "--checkpoint", small_ck[0], "--output-dir", out],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("damage", ["header", "data", "none"])
def test_import_of_a_broken_weights_file_is_a_clear_error(tmp_path, hf_folder, damage):
    folder = str(tmp_path / "hf")
    shutil.copytree(hf_folder, folder)
    weights = os.path.join(folder, "model.safetensors")
    if damage == "none":
        os.remove(weights)
    else:  # cut inside the header, or inside the tensors' data
        os.truncate(weights, 100 if damage == "header" else os.path.getsize(weights) * 9 // 10)
    r = subprocess.run([PYTHON, "tools/import_hf.py", "--hf-dir", folder, "--output", str(tmp_path / "ck")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    if damage == "none":
        assert _one_error(r.stderr) == (f"error: --hf-dir {folder} has no weights: none of model.safetensors, "
                                        "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json")
    else:
        assert _one_error(r.stderr).startswith(f"error: --hf-dir {folder}: cannot read the weights (SafetensorError: ")
    assert not os.path.exists(tmp_path / "ck")


# ----- nothing the user had is lost -----

def _tree(path):
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


def test_export_never_deletes_a_folder_it_did_not_write(tmp_path, small_ck, hf_folder, mcore_single):
    from megatron_effmlm.hf.convert import ConversionError
    from megatron_effmlm.hf.export import EXPORT_MARK, export

    ck = str(tmp_path / "ck")
    shutil.copytree(small_ck[0], ck)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    for out, why in ((ck, f"is not empty and is not an earlier export of this tool (no {EXPORT_MARK})"),
                     (str(notes), f"is not empty and is not an earlier export of this tool (no {EXPORT_MARK})")):
        before = _tree(out)
        with pytest.raises(ConversionError) as e:
            export(ck, out)  # into the checkpoint being exported, or a folder of the user's
        assert str(e.value) == f"--output-dir {out} {why}; choose a new or empty folder"
        assert _tree(out) == before
    # An earlier export is replaced; one the user added a file to is not.
    again = str(tmp_path / "again")
    shutil.copytree(hf_folder, again)
    export(ck, again)
    assert sorted(os.listdir(again)) == sorted(os.listdir(hf_folder))
    (tmp_path / "again" / "results.json").write_text("{}")
    before = _tree(again)
    with pytest.raises(ConversionError) as e:
        export(ck, again)
    assert str(e.value) == (f"--output-dir {again} holds files an earlier export did not write (results.json); "
                            "choose a new or empty folder")
    assert _tree(again) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    export(ck, str(empty))
    assert os.path.isfile(empty / EXPORT_MARK)
    assert sorted(os.listdir(tmp_path)) == ["again", "ck", "empty", "notes"]  # no temporary folder left


def test_a_fresh_run_never_writes_over_another_runs_checkpoints(tmp_path, small_ck):
    ck, args = small_ck
    other = str(tmp_path / "ck")
    shutil.copytree(ck, other)
    before = _tree(other)
    r = subprocess.run([PYTHON, "tests/cli_error_runner.py", "-", "-"], input=json.dumps({
        "fresh": [*args, "--save", other], "overwrite": [*args, "--save", other, "--overwrite-save",
                                                         "--train-iters", "1"]}),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    code, err = got["fresh"]
    assert code == 2, err[-3000:]
    assert _one_error(err) == (f"error: --save {other} already holds checkpoints of another run (latest: iteration "
                               f"2): continue that run with --load {other}, choose another --save folder, or pass "
                               "--overwrite-save to write over them")
    code, err = got["overwrite"]
    assert code == 0, err[-3000:]
    assert open(os.path.join(other, "latest_checkpointed_iteration.txt")).read().strip() == "1"
    assert _tree(os.path.join(other, "iter_0000002")) == {k[len("iter_0000002/"):]: v for k, v in before.items()
                                                          if k.startswith("iter_0000002/")}


def test_export_falls_back_to_the_complete_earlier_checkpoint(tmp_path, small_ck):
    """The latest iteration lacks a shard (or has one cut short): export takes the one before, as --load does."""
    root = str(tmp_path / "ck")
    shutil.copytree(small_ck[0], root)
    latest = os.path.join(root, "iter_0000002")
    shards = sorted(f for f in os.listdir(latest) if f.endswith(".distcp"))
    os.remove(os.path.join(latest, shards[-1]))
    r = subprocess.run([PYTHON, "tools/export_hf.py", "--checkpoint", root, "--output-dir", str(tmp_path / "hf")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"skipping checkpoint {latest}: corrupt or unreadable (IncompleteCheckpointError: "
            f"{os.path.join(latest, shards[-1])} is missing); falling back to the previous one") in r.stderr
    assert f"exporting checkpoint {root}/iter_0000001 instead of the latest {latest}" in r.stderr
    assert r.stdout.startswith(f"exported {root}/iter_0000001 -> {tmp_path / 'hf'}: ")
    assert json.load(open(tmp_path / "hf" / "effmlm_export.json"))["checkpoint"] == f"{root}/iter_0000001"


# ----- no bad value trains silently -----

def _nan_into(iter_dir: str, key: str, where=(3, 5)):
    """One value of checkpoint tensor `key` becomes nan (a flipped exponent bit): its stored item is
    rewritten with that value changed, the rest of the checkpoint left as it is."""
    meta_path = os.path.join(iter_dir, ".metadata")
    meta = pickle.load(open(meta_path, "rb"))
    item = next(k for k in meta.storage_data if k.fqn == key and (k.offset is None or not any(k.offset)))
    info = meta.storage_data[item]
    shard = os.path.join(iter_dir, info.relative_path)
    with open(shard, "rb") as f:
        f.seek(info.offset)
        t = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
    t[where] = float("nan")
    buf = io.BytesIO()
    torch.save(t, buf)
    offset = os.path.getsize(shard)
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    meta.storage_data[item] = dataclasses.replace(info, offset=offset, length=len(buf.getvalue()))
    pickle.dump(meta, open(meta_path, "wb"))


def test_a_checkpoint_with_a_non_finite_weight_is_refused_naming_it(tmp_path, small_ck):
    ck, args = small_ck
    root = str(tmp_path / "ck")
    shutil.copytree(ck, root)
    latest = os.path.join(root, "iter_0000002")
    key = "embedding.word_embeddings.weight"
    _nan_into(latest, key)
    r = subprocess.run([PYTHON, "tests/cli_error_runner.py", "-", "-"], input=json.dumps({
        # first: the runner's logging (the warnings) writes to the first case's stderr
        "fallback": [*args, "--load", root],  # the schedule it was saved with: --train-iters 2
        "only": [*args, "--load", latest, "--train-iters", "3"]}),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    why = f"NonFiniteCheckpointError: {key} holds a non-finite value (nan or inf)"
    code, err = got["only"]
    assert code == 2, err[-3000:]
    assert _one_error(err) == (f"error: --load {latest}: no complete, readable checkpoint (tried {latest}; "
                               f"{latest}: {why})")
    code, err = got["fallback"]
    assert code == 0, err[-3000:]
    assert f"skipping checkpoint {latest}: corrupt or unreadable ({why}); falling back to the previous one" in err
    assert f"loaded checkpoint {root}/iter_0000001 instead of the latest {latest}" in err
