"""The one training loop, for every method and every parallel layout.

It knows nothing of any method: the policy turns batches into model inputs and model
outputs into losses. Forward/backward over micro-batches and pipeline stages is
megatron-core's schedule; gradients go through megatron-core's DDP, the update through
its optimizer and LR scheduler.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps

from megatron_effmlm.atomic import write_json
from megatron_effmlm.checkpoint import dist_ckpt
from megatron_effmlm.checkpoint.run_info import run_info
from megatron_effmlm.config import ConfigError, RunConfig, check_layout
from megatron_effmlm.model.builder import build_model, build_transformer_config, unwrap
from megatron_effmlm.parallel.init import comm_device, initialize_distributed
from megatron_effmlm.plans import get_policy
from megatron_effmlm.training.checkpointer import Checkpointer, every
from megatron_effmlm.training.progress import Progress
from megatron_effmlm.training.schedule import ResumableScheduler, zero_lr_warning
from megatron_effmlm.training.resilience import (EXIT_OK, EXIT_SAVED_RESUMABLE, NonFiniteError, StopRequests,
                                                 all_finite)
from megatron_effmlm.training.step import Step, build_optimizer, wire_grads

logger = logging.getLogger(__name__)


def _has_weights(data_path) -> bool:
    return len(data_path) > 1


def is_logging_rank() -> bool:
    return dist.get_rank() == 0


class Trainer:
    def __init__(self, cfg: RunConfig, tokenizer=None, datasets=None, stop: Optional[StopRequests] = None):
        self.cfg = cfg
        # Signal handlers go in first (pretrain_effmlm.main passes them): a signal during the
        # build is then honoured after the first step instead of killing the process.
        self.stop = stop or StopRequests(False, cfg.train.exit_duration_in_mins)
        par, t = cfg.parallel, cfg.train
        dist_ckpt.check_save_dir(t.save, t.load, t.overwrite_save)  # before any compute
        # The layout is checked before megatron-core sees it: one clear error, not its assert.
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        self.dp_size = check_layout(cfg, world)
        initialize_distributed(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                               par.virtual_pipeline_size(cfg.model.num_layers), t.seed,
                               timeout_minutes=t.distributed_timeout_minutes)
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        if is_logging_rank():
            print(f"parallel layout: world size {dist.get_world_size()} = TP {par.tensor_model_parallel_size} x "
                  f"PP {par.pipeline_model_parallel_size} x DP {self.dp_size}, {self.num_microbatches} "
                  f"micro-batch(es) of {t.micro_batch_size} per step", flush=True)

        if tokenizer is None:
            from megatron_effmlm.data.tokenizer import EffMLMTokenizer

            tokenizer = EffMLMTokenizer.from_dir(cfg.data.tokenizer_dir)
        self.tokenizer = tokenizer
        if cfg.model.vocab_size and cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"--vocab-size {cfg.model.vocab_size} is smaller than the vocabulary of the tokenizer "
                f"in {cfg.data.tokenizer_dir or tokenizer.path} ({tokenizer.vocab_size} tokens)"
            )
        cfg.model.vocab_size = max(cfg.model.vocab_size, tokenizer.vocab_size)
        # Data before the model: a bad --data-path fails in seconds, not after the build.
        self.datasets = datasets if datasets is not None else self._build_datasets()

        self.stage_layers = self._stage_layers()
        self.tconfig = build_transformer_config(cfg.model, par, cfg.precision, self.stage_layers)
        self.model = build_model(cfg.model, par, self.tconfig)
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.precision, par.use_distributed_optimizer)
        self.scheduler = self._build_scheduler()
        self._warned_zero_lr = False
        wire_grads(self.tconfig, self.model, self.optimizer)
        self.policy = get_policy(
            t.method, tokenizer=tokenizer, binary_head=cfg.model.bert_binary_head,
            num_layers=cfg.model.num_layers, seed=t.seed, **t.method_options,
        )
        self.step = Step(self.model, self.policy, self.tconfig, t.micro_batch_size, cfg.model.seq_length)
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_iters = 0
        self.nonfinite_in_a_row = 0  # consecutive steps skipped for a non-finite loss or gradient
        self.exit_code = EXIT_OK
        self.train_flops = 0.0  # model FLOPs of training so far (FLOP model), for the budget
        self.tokens_seen = 0.0  # non-padding input tokens of training so far
        self.train_seconds = 0.0  # wall-clock of the training loop so far (every sitting)
        self._loop_t0 = None  # when this sitting's loop started
        self.checkpointer = Checkpointer(t)
        self._load(t.load, t.save)

    def _build_scheduler(self) -> ResumableScheduler:
        o, t = self.cfg.optim, self.cfg.train
        warmup_steps, decay_steps = self._schedule_span()
        return ResumableScheduler(
            self.optimizer,
            init_lr=0.0 if warmup_steps else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=warmup_steps,
            lr_decay_steps=decay_steps,
            lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
            override_opt_param_scheduler=o.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=o.use_checkpoint_opt_param_scheduler,
            source=t.load or "",
        )

    def _load(self, load: Optional[str], save: Optional[str]) -> None:
        """Resume from --load (weights, optimizer, scheduler, counters, the method's state).
        --load DIR --save DIR (a requeueable job's command line): a missing DIR is a fresh start."""
        if not load or (load == save and not os.path.isdir(load)):
            return
        extra = dist_ckpt.load_checkpoint(
            load, self.model, self.optimizer, self.scheduler,
            {"consumed_samples": 0, "train_flops": 0.0, "tokens_seen": 0.0, "train_seconds": 0.0,
             "policy": self.policy.state_dict(), "run_info": {}},
            vocab_size=self.cfg.model.vocab_size,
        )
        from megatron_effmlm.compat.gpu_fallbacks import fuse_torch_adamw

        fuse_torch_adamw(self.optimizer)  # again: the loaded state's step counts where the fused kernel wants them
        if extra is None:
            return
        self._check_checkpoint_tokenizer(load, extra.get("run_info") or {})
        self.scheduler.check_loaded()
        self.iteration = int(extra["iteration"])
        self.consumed_samples = int(extra["consumed_samples"])
        self.train_flops = float(extra.get("train_flops", 0.0))
        self.tokens_seen = float(extra.get("tokens_seen", 0.0))
        self.train_seconds = float(extra.get("train_seconds", 0.0))
        self.policy.load_state_dict(extra.get("policy", {}))

    def _check_checkpoint_tokenizer(self, load: str, info: dict):
        """Token ids mean the tokens of the tokenizer a checkpoint was trained with: another
        tokenizer of the same vocabulary size would load and train on garbage."""
        made = (info.get("tokenizer") or {}).get("sha1")
        here = self.tokenizer.unique_identifiers["tokenizer_sha1"]
        if made and made != here:
            raise ConfigError(
                f"--load {load}: the checkpoint was trained with the tokenizer in {info['tokenizer'].get('dir')} "
                f"(sha1 {made[:12]}), not the one in {self.tokenizer.path} (sha1 {here[:12]}): the same token "
                "ids mean other tokens (--tokenizer-dir)")

    # The scheduler counts samples; under a FLOP budget it counts the budget in this many units
    # (its position is the fraction spent), so warm-up and decay end where the budget does.
    BUDGET_SCHEDULE_UNITS = 1_000_000

    def predicted_iteration_flops(self) -> float:
        from megatron_effmlm.plans.flops import iteration_flops

        return iteration_flops(self.cfg)

    def _schedule_span(self):
        """(warm-up, decay) lengths in the scheduler's units: samples, or budget units."""
        o, t = self.cfg.optim, self.cfg.train  # values checked by arguments.check_values
        if not t.train_flops_budget:
            decay = (o.lr_decay_iters or max(t.train_iters, 1)) * t.global_batch_size  # --train-iters 0: no step
            if o.lr_warmup_fraction is not None:
                return round(o.lr_warmup_fraction * decay), decay
            return o.lr_warmup_iters * t.global_batch_size, decay
        if o.lr_decay_iters:
            raise ConfigError("--lr-decay-iters does not apply with --train-flops-budget: the schedule decays "
                              "over the budget")
        per_iter = self.predicted_iteration_flops()
        self.budget_iters = math.ceil(t.train_flops_budget / per_iter)
        if t.train_iters < self.budget_iters:
            raise ConfigError(
                f"--train-iters {t.train_iters} stops before --train-flops-budget {t.train_flops_budget:.3e} "
                f"(the FLOP model needs about {self.budget_iters} iterations of --method {t.method}); raise "
                f"--train-iters, it only caps the run")
        units = self.BUDGET_SCHEDULE_UNITS
        if o.lr_warmup_fraction is not None:
            warm = o.lr_warmup_fraction
        else:
            warm = min(1.0, o.lr_warmup_iters * per_iter / t.train_flops_budget)
        return round(warm * units), units

    def _schedule_increment(self, step_flops: float) -> int:
        """How far the scheduler moves for an update: a global batch of samples, or (budget) up
        to the fraction of the budget spent after this step."""
        t = self.cfg.train
        if not t.train_flops_budget:
            return t.global_batch_size
        spent = min(1.0, (self.train_flops + step_flops) / t.train_flops_budget)
        return max(0, math.floor(spent * self.BUDGET_SCHEDULE_UNITS) - self.scheduler.num_steps)

    def _stage_layers(self):
        """Encoder layers per pipeline stage: explicit, balanced by FLOPs, or None (even)."""
        from megatron_effmlm.plans.flops import run_shape
        from megatron_effmlm.parallel.balance import split_by_flops
        from megatron_effmlm.plans import POLICIES

        par = self.cfg.parallel
        if par.pipeline_stage_layers or par.pipeline_model_parallel_size == 1:
            return par.pipeline_stage_layers
        if par.pipeline_split_by != "flops":
            return None
        t = self.cfg.train
        costs, extra = POLICIES[t.method].layer_costs(run_shape(self.cfg), **t.method_options)
        counts = split_by_flops(costs, extra, par.pipeline_model_parallel_size)
        if is_logging_rank():
            print(f"pipeline split by FLOPs: encoder layers per stage {counts}", flush=True)
        return counts

    # ----- data -----
    def _build_datasets(self):
        from megatron_effmlm.data.dataset import build_train_valid_test_datasets

        t, d = self.cfg.train, self.cfg.data
        eval_samples = max(t.eval_iters, 1) * t.global_batch_size  # each evaluation reads the same samples
        return build_train_valid_test_datasets(
            d.data_path,
            tokenizer=self.tokenizer,
            seq_length=self.cfg.model.seq_length,
            split=d.split,
            seed=t.seed,
            train_samples=max(t.train_iters, 1) * t.global_batch_size,  # 0 iterations: still checks the data
            valid_samples=eval_samples,
            # The loop never reads the test split: one epoch of it, or a count for blends.
            test_samples=eval_samples if _has_weights(d.data_path) else None,
            masking_probability=d.mask_prob,
            mask_80_10_10=not d.no_mask_80_10_10,
            whole_word_masking=d.whole_word_masking,
            binary_head=self.cfg.model.bert_binary_head,
            cache_dir=d.data_cache_path,
        )

    def data_iterator(self, dataset, consumed_samples: int):
        """This rank's micro-batches from `consumed_samples` on; with virtual pipeline stages,
        one iterator per model chunk over the same micro-batches (each chunk reads them all)."""
        from megatron_effmlm.data.batches import make_data_iterator

        def one():
            return make_data_iterator(
                dataset, consumed_samples, self.cfg.train.micro_batch_size,
                ps.get_data_parallel_rank(), self.dp_size,
            )

        return [one() for _ in self.model] if len(self.model) > 1 else one()

    # ----- one step -----
    def _reduce_report(self, reports, key="lm loss") -> float:
        """Global mean of a per-token loss: sum over micro-batches and data-parallel ranks
        on the last stage, then shared with every rank of the pipeline (nan if absent)."""
        total = torch.zeros(2, dtype=torch.float64, device=comm_device())
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for r in reports:
                if key in r:
                    total += r[key].double().to(total.device)
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")

    def _forward_flops(self) -> float:
        """Model forward FLOPs of the global batch: every stage and DP rank, one TP rank."""
        local = sum(unwrap(m).forward_flops for m in self.model) if ps.get_tensor_model_parallel_rank() == 0 else 0.0
        for m in self.model:
            unwrap(m).forward_flops = 0.0
        t = torch.tensor([local], dtype=torch.float64, device=comm_device())
        dist.all_reduce(t)
        return t.item()

    def train_step(self, data_iterator) -> dict:
        self.step.zero_grads(self.optimizer)
        if not self._warned_zero_lr:  # never train at LR 0 unseen (a schedule that ended, --lr 0)
            warning = zero_lr_warning(self.optimizer.param_groups[0]["lr"], self.scheduler, self.iteration + 1)
            if warning:
                self._warned_zero_lr = True
                if is_logging_rank():
                    print(warning, file=sys.stderr, flush=True)
        reports = self.step.forward_backward(data_iterator, self.num_microbatches, self.iteration)
        loss = self._reduce_report(reports)
        # A non-finite loss or gradient on any rank: every rank skips the update (and the
        # method's statistics), the batch counts as consumed, as an fp16 overflow would.
        finite = all_finite(loss, self.model, check_grads=not self.cfg.precision.fp16)
        if finite:
            ok, grad_norm, _ = self.optimizer.step()
        else:
            ok, grad_norm = False, float("nan")
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        gbs = self.cfg.train.global_batch_size
        flops = 3.0 * self._forward_flops()  # backward = 2x forward
        if ok:
            self.scheduler.step(increment=self._schedule_increment(flops))
        else:
            self.skipped_iters += 1
        self.iteration += 1
        self.consumed_samples += gbs
        if finite:
            self.policy.after_step(self.iteration)
        else:
            self.policy.discard_step()
        extra = {k: self._reduce_report(reports, k) for k in self.policy.report_keys}  # the method's own terms
        tokens = torch.tensor([self.step.tokens], dtype=torch.float64, device=comm_device())
        dist.all_reduce(tokens, group=ps.get_data_parallel_group())
        self.train_flops += flops
        self.tokens_seen += tokens.item()
        return {
            **{k.replace(" ", "_"): v for k, v in extra.items() if v == v},  # present this step
            "flops": flops,
            "loss": loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens": tokens.item(),
            "skipped": not ok,
            "non_finite": not finite,
        }

    @torch.no_grad()
    def evaluate(self, dataset, eval_iters: int) -> float:
        for m in self.model:
            m.eval()
        self.policy.training = False
        it = self.data_iterator(dataset, 0)
        reports = []
        for _ in range(eval_iters):
            reports += self.step.forward_backward(it, self.num_microbatches, self.iteration, forward_only=True)
        for m in self.model:
            m.train()
        self.policy.training = True
        return self._reduce_report(reports)

    # ----- the loop -----
    def save(self):
        train_seconds = self._agreed_train_seconds()  # a collective: every rank, before the save
        return self.checkpointer.save(
            self.iteration, self.model, self.optimizer, self.scheduler,
            {"consumed_samples": self.consumed_samples, "train_flops": self.train_flops,
             "tokens_seen": self.tokens_seen, "train_seconds": train_seconds,
             "policy": self.policy.state_dict(), "run_info": run_info(self.cfg, self.tokenizer)},
            log=is_logging_rank())

    def _agreed_train_seconds(self) -> float:
        """Training wall-clock so far, the same on every rank (the slowest's): checkpoints'
        common state must agree across ranks."""
        local = self.train_seconds + (time.time() - self._loop_t0 if self._loop_t0 else 0.0)
        t = torch.tensor([local], dtype=torch.float64, device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def train(self) -> Progress:
        t = self.cfg.train
        train_ds, valid_ds, _ = self.datasets
        # Under a budget the FLOP model's estimate is the better total for the ETA.
        total = min(t.train_iters, getattr(self, "budget_iters", t.train_iters))
        progress = Progress(total, self.iteration, t.tensorboard_dir, enabled=is_logging_rank(),
                            extra_keys=[k.replace(" ", "_") for k in self.policy.report_keys])
        it = self.data_iterator(train_ds, self.consumed_samples)
        for m in self.model:
            m.train()
        self._loop_t0 = time.time()
        window_t, window_tokens, window_flops = time.time(), 0.0, 0.0
        self._train_loop(t, progress, it, self.stop, valid_ds, window_t, window_tokens, window_flops)
        self.train_seconds = self._agreed_train_seconds()
        self._loop_t0 = time.time()
        # --train-iters 0 saves the initial weights (iteration 0: weights only), whatever --save-interval
        if self.checkpointer.due_at_end(self.iteration, t.train_iters):
            self.save()
        progress.write_curve(t.loss_curve)
        progress.close()
        self._finish(progress)
        return progress

    def _finish(self, progress):
        """The final log line and --summary-json: what the run cost and where it ended."""
        t = self.cfg.train
        lr = self.optimizer.param_groups[0]["lr"]
        budget_reached = bool(t.train_flops_budget and self.train_flops >= t.train_flops_budget)
        if not is_logging_rank():
            return
        print(f"finished at iteration {self.iteration}: {self.train_flops:.4e} training FLOPs (FLOP model), "
              f"{self.tokens_seen:,.0f} tokens seen, {self.train_seconds:.1f} s of training, lr {lr:.3e}", flush=True)
        if t.train_flops_budget and not budget_reached and self.exit_code == EXIT_OK:
            by_exit = every(t.exit_interval, self.iteration) and self.iteration < t.train_iters
            where = f"--exit-interval {t.exit_interval}" if by_exit else f"--train-iters {t.train_iters}"
            print(f"warning: stopped at iteration {self.iteration} (by {where}) before --train-flops-budget "
                  f"{t.train_flops_budget:.3e}: the schedule is not fully decayed", flush=True)
        if not t.summary_json:
            return
        train = progress.history["train"]
        valid = progress.history["valid"]
        m = self.cfg.model
        summary = {
            "method": t.method, "method_options": t.method_options, "mask_prob": self.cfg.data.mask_prob,
            "iterations": self.iteration, "consumed_samples": self.consumed_samples,
            "global_batch_size": t.global_batch_size, "seq_length": m.seq_length,
            "train_flops": self.train_flops, "train_flops_budget": t.train_flops_budget,
            "budget_reached": budget_reached, "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds, "world_size": dist.get_world_size(),
            "final_lr": lr, "min_lr": self.cfg.optim.min_lr, "max_lr": self.cfg.optim.lr,
            "lr_decay_style": self.cfg.optim.lr_decay_style,
            "final_loss": train[-1][1] if train else None,
            "last_valid_loss": valid[-1][1] if valid else None,
            "skipped_iterations": self.skipped_iters, "exit_code": self.exit_code,
        }
        os.makedirs(os.path.dirname(os.path.abspath(t.summary_json)), exist_ok=True)
        write_json(t.summary_json, summary)

    def _train_loop(self, t, progress, it, stop, valid_ds, window_t, window_tokens, window_flops):
        if t.train_flops_budget and self.train_flops >= t.train_flops_budget:
            return  # resumed after the budget was spent: nothing left to train
        while self.iteration < t.train_iters:
            stats = self.train_step(it)
            if stats["non_finite"]:
                self._non_finite_step(t, progress)
            window_tokens += stats["tokens"]
            window_flops += stats.pop("flops")
            progress.history["flops"].append((self.iteration, self.train_flops))
            if self.iteration % t.log_interval == 0 or self.iteration == t.train_iters:
                dt = time.time() - window_t
                stats["tokens_per_s"] = window_tokens / max(dt, 1e-9)
                stats["tflops"] = window_flops / max(dt, 1e-9) / 1e12  # model TFLOP/s, all ranks
                stats["train_flops"] = self.train_flops
                if t.peak_tflops:
                    stats["mfu"] = stats["tflops"] / (t.peak_tflops * dist.get_world_size())
                stats["skipped"] = self.skipped_iters
                progress.log_train(self.iteration, stats)
                window_t, window_tokens, window_flops = time.time(), 0.0, 0.0
            else:
                progress.history["train"].append((self.iteration, stats["loss"]))
            if valid_ds is not None and every(t.eval_interval, self.iteration):
                progress.log_valid(self.iteration, self.evaluate(valid_ds, t.eval_iters))
            if self.checkpointer.due(self.iteration):
                self.save()
                progress.write_curve(t.loss_curve)
            if every(t.exit_interval, self.iteration):
                break
            if t.train_flops_budget and self.train_flops >= t.train_flops_budget:
                if is_logging_rank():
                    print(f"reached --train-flops-budget {t.train_flops_budget:.3e} at iteration "
                          f"{self.iteration} ({self.train_flops:.3e} FLOPs)", flush=True)
                break
            reason = stop.check()  # collective: every rank stops after the same step
            if reason:
                if is_logging_rank():
                    print(f"stopping at iteration {self.iteration} on {reason}: saving a checkpoint and exiting "
                          f"with code {EXIT_SAVED_RESUMABLE} (resumable)", flush=True)
                self.exit_code = EXIT_SAVED_RESUMABLE
                break

    def _non_finite_step(self, t, progress):
        limit = t.max_skipped_iterations
        if is_logging_rank():
            print(f"iteration {self.iteration}: non-finite loss or gradient, update skipped "
                  f"({self.nonfinite_in_a_row} in a row, --max-skipped-iterations {limit}; "
                  f"{self.skipped_iters} skipped in all)", flush=True)
        if self.nonfinite_in_a_row <= limit:
            return
        where = "no --save given, nothing saved"
        if t.save:
            where = f"the last good state is saved in {self.save()}"
            progress.write_curve(t.loss_curve)
        raise NonFiniteError(
            f"{self.nonfinite_in_a_row} iterations in a row (up to iteration {self.iteration}) had a non-finite "
            f"loss or gradient, more than --max-skipped-iterations {limit}; {where}")
