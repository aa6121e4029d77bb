"""Checkpoints with megatron-core's dist_checkpointing, written atomically.

Layout under `--save DIR`:
    DIR/iter_0000100/          one complete checkpoint (torch_dist format, any TP/PP layout)
    DIR/latest_checkpointed_iteration.txt
A checkpoint is written to `iter_XXXXXXX.tmp` and renamed only after every rank finished,
and the tracker file is replaced atomically after that: a crash or SIGTERM mid-save leaves
the previous checkpoint as the one `--load` picks. Before anything reads a checkpoint,
`check_safe` reads every pickle in it without building arbitrary objects: torch DCP's
`.metadata` with an unpickler that admits only checkpoint metadata classes, `common.pt` and
every non-tensor item of every `.distcp` shard (which torch DCP's default planner would read
with weights_only=False) with torch's weights-only unpickler. A partial or corrupt latest
checkpoint is skipped with a warning naming it, and the previous complete one is loaded.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing import serialization
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from megatron_effmlm.atomic import write_text
from megatron_effmlm.checkpoint.errors import CheckpointError  # noqa: F401  (raised here; importers take it from here too)
from megatron_effmlm.checkpoint.lifeline import die_with_parent, serve_for_parent
from megatron_effmlm.cli import no_such_dir
from megatron_effmlm.model.builder import unwrap

logger = logging.getLogger(__name__)
TRACKER = "latest_checkpointed_iteration.txt"
# What reading a torn or corrupt checkpoint raises; torch DCP's CheckpointException (it
# gathers every rank's failure) is a BaseException.
_READ_ERRORS = (Exception, CheckpointException)


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _layout():
    return [
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    ]


def _rng_state():
    return {
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8),
    }


def _rng_sharded_object(rng):
    tp, pp, dp = _layout()
    return ShardedObject(
        "rng_state",
        rng,
        (pp, tp, dp),
        (
            ps.get_pipeline_model_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank(),
        ),
        replica_id=0,
    )


def _sharded_state_dict(model, optimizer, scheduler, extra: dict, rng=None, is_loading=False):
    sd = {}
    for i, chunk in enumerate(model):
        sd[f"model{i}" if len(model) > 1 else "model"] = unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if rng is not None:
        sd["rng_state"] = _rng_sharded_object(rng)
    sd["layout"] = _layout()
    sd.update(extra)
    return sd


_writers_guarded = False


def _guard_writer_processes():
    """dist_checkpointing's torch_dist writer forks one process per write bucket and keeps a
    spawn-context multiprocessing Manager (its results queue) for the process's lifetime:
    after a SIGKILL of the trainer they would live on (and keep writing into iter_*.tmp).
    Forked children set PDEATHSIG at fork; the Manager is started here with it as initializer,
    in the module global its writer creates lazily."""
    global _writers_guarded
    if _writers_guarded:
        return
    _writers_guarded = True
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    forking = {}
    os.register_at_fork(before=lambda: forking.__setitem__("pid", os.getpid()),
                        after_in_child=lambda: die_with_parent(forking["pid"]))
    if getattr(filesystem_async, "_results_queue", None) is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=serve_for_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()
        filesystem_async._effmlm_manager = manager  # keep it referenced: its finalizer stops the server


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, extra: dict) -> str:
    """Save atomically; returns the final directory. `extra` holds plain values/tensors
    (iteration, consumed samples, the method's state)."""
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    _guard_writer_processes()
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        os.makedirs(tmp)
    dist.barrier()
    # Before the first update the optimizer has no state to save: iteration 0 is weights
    # only (an initialisation or an imported model), and loading it starts a fresh optimizer.
    with_optim = iteration > 0
    sd = _sharded_state_dict(
        model, optimizer if with_optim else None, scheduler if with_optim else None,
        dict(extra, iteration=iteration, has_optimizer=with_optim), rng=_rng_state(),
    )
    dist_checkpointing.save(sd, tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_text(os.path.join(root, TRACKER), f"{iteration}\n", fsync=True)
        _fsync_dir(root)
    dist.barrier()
    return final


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iterations_on_disk(root: str):
    """Iterations of the `iter_XXXXXXX` directories under `root` (not `.tmp`), newest first."""
    found = []
    for name in os.listdir(root):
        m = re.fullmatch(r"iter_(\d{7})", name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append(int(m.group(1)))
    return sorted(found, reverse=True)


def _is_complete(path: str) -> bool:
    return os.path.isdir(path) and dist_checkpointing.check_is_distributed_checkpoint(path)


def find_candidates(root: str):
    """Checkpoint directories to try under `root`, best first: the one the tracker names,
    then every older `iter_*` directory. [] when `root` holds no checkpoint (a fresh start)."""
    if missing := no_such_dir("--load", root):
        raise CheckpointError(missing)
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        if dist_checkpointing.check_is_distributed_checkpoint(root):
            return [root]  # --load pointed at one checkpoint directory
        on_disk = _iterations_on_disk(root)
        if on_disk:
            _warn(f"{tracker} is missing; trying the checkpoints on disk, newest first")
        return [checkpoint_dir(root, i) for i in on_disk]
    text = open(tracker).read().strip()
    try:
        iteration = int(text)
    except ValueError:
        _warn(f"{tracker}: expected an iteration number, found {text!r}; trying the checkpoints on disk")
        return [checkpoint_dir(root, i) for i in _iterations_on_disk(root)]
    return [checkpoint_dir(root, iteration)] + [checkpoint_dir(root, i) for i in _iterations_on_disk(root) if i < iteration]


def check_save_dir(save, load, overwrite: bool = False):
    """Refuse a run that would write over another run's checkpoints: `save` holds checkpoints
    and the run does not continue from them (`load` is not `save` or a checkpoint in it)."""
    if not save or overwrite or not os.path.isdir(save):
        return
    save_abs = os.path.abspath(save)
    if load and (os.path.abspath(load) + os.sep).startswith(save_abs + os.sep):
        return  # continuing what is there
    held = _iterations_on_disk(save)
    if not held and not os.path.exists(os.path.join(save, TRACKER)):
        return
    latest = f" (latest: iteration {held[0]})" if held else ""
    raise CheckpointError(f"--save {save} already holds checkpoints of another run{latest}: continue that run "
                          f"with --load {save}, choose another --save folder, or pass --overwrite-save to write "
                          "over them")


def find_latest(root: str):
    """The directory of the latest complete checkpoint under `root`, or None."""
    for path in find_candidates(root):
        if _is_complete(path):
            return path
    return None


def _warn(msg: str):
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.warning(msg)


def _check_model_shapes(path: str, model, allow_missing=(), vocab_size=None, common=None):
    """One clear error when the checkpoint is of another model (size, layers, vocabulary).
    `allow_missing`: key prefixes a weights-only checkpoint may lack (FRESH_PREFIXES).
    Vocabulary-parallel tensors may differ in their padded rows (another TP size pads the
    vocabulary to another multiple): megatron-core loads the rows both have and zeroes the
    rest, so the real vocabularies (`vocab_size`, and the one run_info records) must agree."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved_vocab = ((common or {}).get("run_info") or {}).get("model", {}).get("vocab_size")
    if vocab_size and saved_vocab and saved_vocab != vocab_size:
        raise CheckpointError(f"checkpoint {path} is of another vocabulary size: {saved_vocab} tokens there, "
                              f"{vocab_size} here (--vocab-size, or the tokenizer in --tokenizer-dir)")
    saved = dist_checkpointing.load_tensors_metadata(path)
    for chunk in model:
        for t in nested_values(unwrap(chunk).sharded_state_dict()):
            if not isinstance(t, ShardedTensor):
                continue
            if t.key not in saved:
                if t.key.startswith(tuple(allow_missing)):
                    continue
                raise CheckpointError(f"checkpoint {path} is of another model: it has no {t.key} "
                                      f"(a different --method, --num-layers or layer type?)")
            there, here = tuple(saved[t.key].global_shape), tuple(t.global_shape)
            if there != here and t.allow_shape_mismatch and saved_vocab and vocab_size and there[1:] == here[1:] \
                    and min(there[0], here[0]) >= vocab_size:
                continue  # only the vocabulary padding differs
            if there != here:
                raise CheckpointError(f"checkpoint {path} is of another model size: {t.key} has shape "
                                      f"{list(there)} there and {list(here)} here")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file would unpickle something other than tensors and checkpoint metadata."""


class NonFiniteCheckpointError(Exception):
    """A loaded weight holds nan or inf (a flipped bit): treated as a corrupt checkpoint."""


class IncompleteCheckpointError(Exception):
    """A shard that `.metadata` names is missing or shorter than the items it should hold (a
    read error, like a corrupt file: loading falls back to the previous checkpoint)."""


class _MetadataUnpickler(pickle.Unpickler):
    """torch DCP reads `.metadata` with plain pickle; this one admits only the classes such
    metadata is made of, so checking a file first means no arbitrary object is ever built."""

    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        ok = module.startswith("torch.distributed.checkpoint.") or (
            module == "torch" and isinstance(getattr(torch, name, None), (type(torch.Size), torch.dtype, torch.layout,
                                                                          torch.memory_format))
        ) or (module, name) in {("torch", "Size"), ("torch._utils", "_get_layout"),
                                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
        if not ok:
            raise UnsafeCheckpointError(f"refusing to load {self.path}: it would unpickle {module}.{name} "
                                        "(only tensors and checkpoint metadata are loaded)")
        return super().find_class(module, name)


def _refuse(path: str, error: pickle.UnpicklingError):
    """UnsafeCheckpointError for torch's weights-only refusal of `path`; other errors as they are."""
    # torch names the refused global ("Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y ...")
    if "Weights only load failed" in str(error) and "global" in str(error).lower():
        first = next((l for l in str(error).splitlines()[1:] if "global" in l.lower()), "")
        return UnsafeCheckpointError(f"refusing to load {path}: it would unpickle an arbitrary object "
                                     f"({first.strip()[:200]}); only tensors are loaded")
    return error


class _BytesChecker:
    """Stands in for the load planner in FileSystemReader.read_data: torch DCP's default
    planner unpickles a shard's non-tensor (BYTE_IO) items with torch.load(weights_only=False);
    this one reads the same bytes with the weights-only unpickler, and keeps nothing."""

    def __init__(self, path: str, storage_data):
        self.path, self.storage_data = path, storage_data

    def load_bytes(self, read_item, value):
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            shard = os.path.join(self.path, self.storage_data[read_item.storage_index].relative_path)
            raise _refuse(shard, e) from None


def _check_shards_present(path: str, metadata):
    """Every file `.metadata` points into exists and holds the bytes it points at."""
    need = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise IncompleteCheckpointError(f"{f} is missing")
        if os.path.getsize(f) < size:
            raise IncompleteCheckpointError(f"{f} is cut short ({os.path.getsize(f)} bytes, {size} expected)")


def check_safe(path: str):
    """Raise UnsafeCheckpointError unless reading checkpoint directory `path` unpickles only
    tensors and checkpoint metadata: `.metadata` (plain pickle in torch DCP), `common.pt`, and
    every non-tensor item of every `.distcp` shard (torch DCP's default planner reads those with
    weights_only=False). Tensor items are read by torch DCP with weights_only=True. Other read
    errors propagate as they are (a corrupt file). Call it before anything else reads `path`."""
    import json

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    info = os.path.join(path, "metadata.json")
    if os.path.exists(info):  # another backend would be read by other (unchecked) code
        with open(info) as f:
            backends = json.load(f)
        if (backends.get("sharded_backend"), backends.get("common_backend")) != ("torch_dist", "torch"):
            raise UnsafeCheckpointError(f"refusing to load {path}: {info} names backends {backends.get('sharded_backend')!r}"
                                        f"/{backends.get('common_backend')!r}; only torch_dist/torch are loaded")
    meta = os.path.join(path, ".metadata")
    if os.path.exists(meta):
        with open(meta, "rb") as f:
            metadata = _MetadataUnpickler(f, meta).load()
        _check_shards_present(path, metadata)
        items = [ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(fqn), dest_offsets=torch.Size((0,)),
                          storage_index=MetadataIndex(fqn), storage_offsets=torch.Size((0,)), lengths=torch.Size((0,)))
                 for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)]
        reader = FileSystemReader(path)
        reader.set_up_storage_reader(metadata, is_coordinator=True)
        reader.read_data(LoadPlan(items), _BytesChecker(path, metadata.storage_data)).wait()
    common = os.path.join(path, "common.pt")
    if os.path.exists(common):
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refuse(common, e) from None


def _describe(error) -> str:
    if error is None:
        return "on another rank"
    if isinstance(error, CheckpointException):  # torch DCP: {rank: (exception, traceback)}
        failures = getattr(error, "failures", {}) or {}
        first = next(iter(failures.values()), None)
        first = first[0] if isinstance(first, tuple) else first
        return f"{type(first).__name__ if first is not None else 'error'} reading it on rank(s) {sorted(failures)}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _agree(ok: bool) -> bool:
    """True iff `ok` on every rank."""
    if not dist.is_initialized():
        return ok
    from megatron_effmlm.parallel.init import comm_device

    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not flag.item()


# Parameters a weights-only checkpoint may lack: 3ML's decoder and e_mask when 3ML continues an
# encoder that never had them (tools/import_hf.py, another method's initialisation).
FRESH_PREFIXES = ("decoder.", "mask_embedding")


def _drop_absent_fresh(sd: dict, path: str) -> dict:
    """Remove FRESH_PREFIXES entries the checkpoint does not hold (they keep their
    initialisation); returns {model key: names removed}."""
    # ShardedObjects (_extra_state) are listed per shard: "<key>/shard_<i>_<n>"
    held = {k.split("/shard_")[0] for k in serialization.load_sharded_metadata(path)}
    dropped = {}
    for key, msd in sd.items():
        if key.startswith("model"):
            names = {n for n, v in msd.items() if n.startswith(FRESH_PREFIXES) and getattr(v, "key", n) not in held}
            for n in names:
                del msd[n]
            if names:
                dropped[key] = names
    if dropped and dist.get_rank() == 0:
        logger.warning("checkpoint %s has no %s: initialised fresh", path,
                       ", ".join(sorted({n.split(".")[0] for names in dropped.values() for n in names})))
    return dropped


def load_checkpoint(root: str, model, optimizer, scheduler, extra_template: dict, vocab_size=None):
    """Load the latest complete, readable checkpoint under `root` into model/optimizer/scheduler.

    A latest checkpoint that is partial (no metadata) or corrupt (a shard or the common state
    cannot be read) is skipped with a warning naming it, and the previous one is loaded.
    Returns the checkpoint's extra values (iteration, consumed samples, method state), or
    None when `root` holds no checkpoint yet (a fresh start). `vocab_size`: the model's real
    (unpadded) vocabulary; given, a checkpoint padded for another TP size loads too."""
    candidates = find_candidates(root)
    if not candidates:
        return None
    last = ""  # why the last one tried was skipped
    for n, path in enumerate(candidates):
        if not _is_complete(path):
            _warn(f"skipping checkpoint {path}: partial or missing (no dist_checkpointing metadata); "
                  "falling back to the previous one")
            continue
        try:
            check_safe(path)
            common = dist_checkpointing.load_common_state_dict(path)
            weights_only = not common.get("has_optimizer", True)
            _check_model_shapes(path, model, FRESH_PREFIXES if weights_only else (), vocab_size, common)
        except CheckpointError:
            raise
        except _READ_ERRORS as e:
            error = e
        else:
            error = None
            try:
                result = _load_one(path, common, model, optimizer, scheduler, extra_template)
            except CheckpointError:
                raise
            except _READ_ERRORS as e:  # a torn or corrupt file: megatron-core / torch DCP errors
                error = e
        if _agree(error is None):
            if n:
                _warn(f"loaded checkpoint {path} instead of the latest {candidates[0]}")
            return result
        _warn(f"skipping checkpoint {path}: corrupt or unreadable ({_describe(error)}); falling back to the previous one")
        last = f"; {path}: {_describe(error)}"
    raise CheckpointError(f"--load {root}: no complete, readable checkpoint (tried {', '.join(candidates)}{last})")


def _check_finite(tensors: dict):
    """Raise NonFiniteCheckpointError on every rank, naming the first weight (checkpoint key) that
    holds nan or inf on any rank: a flipped bit must not train silently."""
    bad = sorted(k for k, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point()
                 and not bool(torch.isfinite(t).all()))
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, bad[:1])
        bad = sorted({k for b in every for k in b})
    if bad:
        raise NonFiniteCheckpointError(f"{bad[0]} holds a non-finite value (nan or inf)")


def _load_one(path: str, common: dict, model, optimizer, scheduler, extra_template: dict):
    same_layout = list(common.get("layout", [])) == _layout()
    # RNG streams are per rank: restore them only on the layout that wrote them.
    rng = _rng_state() if same_layout else None
    live_optimizer = optimizer
    if not common.get("has_optimizer", True):
        optimizer = scheduler = None
    sd = _sharded_state_dict(model, optimizer, scheduler, extra_template, rng=rng, is_loading=True)
    fresh = _drop_absent_fresh(sd, path) if optimizer is None else {}
    keys = {k: {n: getattr(v, "key", n) for n, v in msd.items()} for k, msd in sd.items() if k.startswith("model")}
    loaded = dist_checkpointing.load(sd, path)  # read errors propagate: load_checkpoint falls back
    _check_finite({keys[k].get(n, n): t for k in keys for n, t in loaded[k].items()})
    for i, chunk in enumerate(model):
        name = f"model{i}" if len(model) > 1 else "model"
        result = unwrap(chunk).load_state_dict(loaded[name], strict=not fresh.get(name))
        if fresh.get(name):  # only what was dropped on purpose may be missing
            assert set(result.missing_keys) <= fresh[name] and not result.unexpected_keys, result
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    elif live_optimizer is not None:
        # Weights only: a 16-bit model's fp32 main parameters (megatron-core's mixed precision)
        # still hold the initial weights; train from the loaded ones.
        live_optimizer.reload_model_params()
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if rng is not None:
        r = loaded["rng_state"]
        torch.set_rng_state(r["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(r["tracker"])
        if torch.cuda.is_available() and r["cuda"].numel():
            torch.cuda.set_rng_state(r["cuda"])
    elif dist.get_rank() == 0:
        logger.warning("checkpoint %s was saved on layout %s, now %s: RNG states start fresh",
                       path, common.get("layout"), _layout())
    logger.info("loaded checkpoint %s (iteration %s)", path, loaded.get("iteration"))
    return {k: loaded[k] for k in list(extra_template) + ["iteration"] if k in loaded}
