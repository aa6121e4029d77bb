"""Runs training scenarios inside one process group (launched by torchrun from the tests),
so that several parallel layouts share one start-up. Rank 0 writes the results as JSON.

    torchrun --nproc-per-node N tests/dist_worker.py SPEC.json OUT.json

SPEC: {"common": [flags...], "scenarios": {"name": {"args": [flags...], "steps": k,
       "grads": bool, "save_init": dir}}}
Per scenario the result holds the loss, grad norm and lr of each step and, with "grads",
the full (TP-gathered) gradient of every parameter after the first step.
"""

import json
import sys


def gathered_grads(model):
    """{name: full gradient} of rank's chunk, TP shards concatenated along partition_dim."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_effmlm.model.builder import unwrap

    out = {}
    tp = ps.get_tensor_model_parallel_world_size()
    for name, p in unwrap(model[0]).named_parameters():
        g = p.main_grad.detach().clone().float()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g, group=ps.get_tensor_model_parallel_group())
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g.tolist()
    return out


SEND_LOG = {"current": None, "patched": False}


def count_p2p_sends(log):
    """Record the float tensors megatron-core's p2p layer sends to the next pipeline stage
    (shape-exchange tensors are int64 and are skipped) into `log` (patched once per process)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    SEND_LOG["current"] = log
    if SEND_LOG["patched"]:
        return
    SEND_LOG["patched"] = True
    orig_op, orig_isend = dist.P2POp, dist.isend

    def record(tensor, peer):
        if SEND_LOG["current"] is not None and tensor.is_floating_point() and \
                not ps.is_pipeline_last_stage() and peer == ps.get_pipeline_model_parallel_next_rank():
            SEND_LOG["current"].append(list(tensor.shape))

    def p2p_op(op, tensor, peer=None, group=None, tag=0, group_peer=None):
        if op in (orig_isend, isend):
            record(tensor, peer)
            op = orig_isend
        return orig_op(op, tensor, peer, group, tag)

    def isend(tensor, dst=None, group=None, tag=0, **kw):
        record(tensor, dst)
        return orig_isend(tensor, dst, group, tag, **kw)

    dist.P2POp, dist.isend = p2p_op, isend


def batch_stats(trainer, log, mask_id):
    """Per micro-batch: real tokens and [MASK] inputs of each row (for expected carry sizes)."""
    orig = trainer.policy.model_inputs

    def wrapped(batch, step):
        log.append({"real": batch["padding_mask"].sum(1).tolist(),
                    "masks": ((batch["text"] == mask_id) & (batch["padding_mask"] == 1)).sum(1).tolist(),
                    "seq": batch["text"].shape[1], "b": batch["text"].shape[0]})
        return orig(batch, step)

    trainer.policy.model_inputs = wrapped


def run_scenario(common, sc):
    import torch.distributed as dist

    from megatron_effmlm.arguments import parse_args
    from megatron_effmlm.parallel.init import destroy_model_parallel
    from megatron_effmlm.training.loop import Trainer

    cfg = parse_args(common + sc["args"])
    trainer = Trainer(cfg)
    if sc.get("train"):  # the whole loop (budget, summary): the result is its --summary-json
        trainer.train()
        result = {"summary": json.load(open(cfg.train.summary_json)) if dist.get_rank() == 0 else None}
        destroy_model_parallel()
        return result
    if sc.get("save_init"):
        cfg.train.save = sc["save_init"]
        trainer.save()
    sends, stats = [], []
    if sc.get("count_p2p"):
        count_p2p_sends(sends)
        batch_stats(trainer, stats, trainer.tokenizer.mask)
    it = trainer.data_iterator(trainer.datasets[0], trainer.consumed_samples)
    steps, grads = [], None
    for k in range(sc.get("steps", 3)):
        s = trainer.train_step(it)
        steps.append({"iteration": trainer.iteration, "loss": s["loss"], "grad_norm": s["grad_norm"], "lr": s["lr"]})
        if k == 0 and sc.get("grads"):
            grads = gathered_grads(trainer.model)
    if sc.get("save_final"):
        cfg.train.save = sc["save_final"]
        trainer.save()
    SEND_LOG["current"] = None
    result = {"steps": steps, "sends": sends, "batch_stats": stats}
    if grads is not None and dist.get_rank() == 0:
        result["grads"] = grads
    destroy_model_parallel()
    return result


def main():
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    spec = json.load(open(sys.argv[1]))
    results = {}
    for name, sc in spec["scenarios"].items():
        results[name] = run_scenario(spec.get("common", []), sc)
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
