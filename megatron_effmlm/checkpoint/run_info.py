"""What a checkpoint records about the run that wrote it: the model configuration (so that
tools/export_hf.py can rebuild the model on any layout), the method, the data and the
tokenizer. Plain values only (dist_checkpointing's common state, read back weights-only)."""

from __future__ import annotations

import dataclasses


def run_info(cfg, tokenizer) -> dict:
    return {
        "model": dataclasses.asdict(cfg.model),
        "method": cfg.train.method,
        "method_options": dict(cfg.train.method_options),
        "data_path": list(cfg.data.data_path),
        "mask_prob": cfg.data.mask_prob,
        "global_batch_size": cfg.train.global_batch_size,
        "tokenizer": {"dir": tokenizer.path, "sha1": tokenizer.unique_identifiers["tokenizer_sha1"],
                      "vocab_size": tokenizer.vocab_size},
    }
