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


def run_scenario(common, sc):
    import torch.distributed as dist

    from megatron_effmlm.arguments import parse_args
    from megatron_effmlm.parallel.init import destroy_model_parallel
    from megatron_effmlm.training.loop import Trainer

    cfg = parse_args(common + sc["args"])
    trainer = Trainer(cfg)
    if sc.get("save_init"):
        cfg.train.save = sc["save_init"]
        trainer.save()
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
    result = {"steps": steps}
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
