"""Progress line, TensorBoard scalars and the loss-curve PNG (rank 0 only)."""

from __future__ import annotations

import os
import time

from megatron_effmlm.atomic import save_figure, write_json


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_iters: int, start_iter: int, tensorboard_dir=None, enabled=True, extra_keys=()):
        self.total, self.start = total_iters, start_iter
        self.extra_keys = tuple(extra_keys)  # the method's loss terms besides the MLM loss (Policy.report_keys)
        self.enabled = enabled
        self.t0 = time.time()
        self.history = {"train": [], "valid": [], "flops": []}  # (iteration, loss); (iteration, train FLOPs)
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def log_train(self, iteration: int, scalars: dict):
        self.history["train"].append((iteration, scalars["loss"]))
        if not self.enabled:
            return
        elapsed = time.time() - self.t0
        done = iteration - self.start
        eta = elapsed / max(done, 1) * (self.total - iteration)
        fields = [f"iter {iteration:>6d}/{self.total}"]
        fields += [f"loss {scalars['loss']:.4f}"]
        fields += [f"{k.replace('_', ' ')} {scalars[k]:.4f}" for k in self.extra_keys if k in scalars]
        fields += [f"lr {scalars['lr']:.3e}", f"grad norm {scalars['grad_norm']:.3f}"]
        fields += [f"tok/s {scalars['tokens_per_s']:,.0f}"]
        if "tflops" in scalars:
            fields.append(f"TFLOP/s {scalars['tflops']:.3f}")
        if "mfu" in scalars:
            fields.append(f"MFU {100 * scalars['mfu']:.1f}%")
        if scalars.get("skipped"):
            fields.append(f"skipped {scalars['skipped']}")
        fields += [f"elapsed {_hms(elapsed)}", f"ETA {_hms(eta)}"]
        print(" | ".join(fields), flush=True)
        if self.writer:
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", v, iteration)
            self.writer.flush()

    def log_valid(self, iteration: int, loss: float):
        self.history["valid"].append((iteration, loss))
        if not self.enabled:
            return
        print(f"validation at iter {iteration}: loss {loss:.4f}", flush=True)
        if self.writer:
            self.writer.add_scalar("valid/loss", loss, iteration)
            self.writer.flush()

    def write_curve(self, png_path: str, title: str = "MLM loss"):
        if not self.enabled or not png_path or not self.history["train"]:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        it, loss = zip(*self.history["train"])
        ax.plot(it, loss, label="train")
        if self.history["valid"]:
            vit, vloss = zip(*self.history["valid"])
            ax.plot(vit, vloss, "o-", label="validation")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
        save_figure(fig, png_path)
        write_json(os.path.splitext(png_path)[0] + ".json", self.history, indent=None)

    def close(self):
        if self.writer:
            self.writer.close()
