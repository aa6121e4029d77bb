"""Checkpoints with megatron-core's dist_checkpointing, written atomically.

Layout under `--save DIR`:
    DIR/iter_0000100/          one complete checkpoint (torch_dist format, any TP/PP layout)
    DIR/latest_checkpointed_iteration.txt
A checkpoint is written to `iter_XXXXXXX.tmp` and renamed only after every rank finished,
and the tracker file is replaced atomically after that: a crash or SIGTERM mid-save leaves
the previous checkpoint as the one `--load` picks. Loading goes through torch's
weights-only unpickler (dist_checkpointing's common state) and torch_dist shards: no
arbitrary objects are unpickled.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing import serialization
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_effmlm.model.builder import unwrap

logger = logging.getLogger(__name__)
TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    pass


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


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, extra: dict) -> str:
    """Save atomically; returns the final directory. `extra` holds plain values/tensors
    (iteration, consumed samples, the method's state)."""
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
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
        _write_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
        _fsync_dir(root)
    dist.barrier()
    return final


def _write_atomic(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_latest(root: str):
    """The directory of the latest complete checkpoint under `root`, or None."""
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: no such directory")
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        if dist_checkpointing.check_is_distributed_checkpoint(root):
            return root  # --load pointed at one checkpoint directory
        return None
    text = open(tracker).read().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
    path = checkpoint_dir(root, iteration)
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise CheckpointError(f"{tracker} names iteration {iteration} but {path} is not a complete checkpoint")
    return path


# Parameters a weights-only checkpoint may lack: 3ML's decoder and e_mask when 3ML continues an
# encoder that never had them (tools/import_hf.py, another method's initialisation).
FRESH_PREFIXES = ("decoder.", "mask_embedding")


def _drop_absent_fresh(sd: dict, path: str) -> dict:
    """Remove FRESH_PREFIXES entries the checkpoint does not hold (they keep their
    initialisation); returns {model key: names removed}."""
    held = set(serialization.load_sharded_metadata(path))
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


def load_checkpoint(root: str, model, optimizer, scheduler, extra_template: dict):
    """Load the latest checkpoint under `root` into model/optimizer/scheduler in place.

    Returns the checkpoint's extra values (iteration, consumed samples, method state), or
    None when `root` holds no checkpoint yet (a fresh start)."""
    path = find_latest(root)
    if path is None:
        return None
    common = dist_checkpointing.load_common_state_dict(path)
    same_layout = list(common.get("layout", [])) == _layout()
    # RNG streams are per rank: restore them only on the layout that wrote them.
    rng = _rng_state() if same_layout else None
    if not common.get("has_optimizer", True):
        optimizer = scheduler = None
    sd = _sharded_state_dict(model, optimizer, scheduler, extra_template, rng=rng, is_loading=True)
    fresh = _drop_absent_fresh(sd, path) if optimizer is None else {}
    try:
        loaded = dist_checkpointing.load(sd, path)
    except Exception as e:  # name the checkpoint; megatron-core's messages are about keys
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from e
    for i, chunk in enumerate(model):
        name = f"model{i}" if len(model) > 1 else "model"
        result = unwrap(chunk).load_state_dict(loaded[name], strict=not fresh.get(name))
        if fresh.get(name):  # only what was dropped on purpose may be missing
            assert set(result.missing_keys) <= fresh[name] and not result.unexpected_keys, result
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
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
