"""Export a checkpoint (any TP/PP layout, any method) to a transformers model folder.

The checkpoint is loaded on one process through megatron-core's dist_checkpointing (which
reshards any saved layout), converted by `convert.to_hf`, loaded into the transformers class
and saved with its own `save_pretrained` (config.json, model.safetensors), next to the
tokenizer's files and a model card. The export then checks itself: the folder is loaded back
with transformers and its outputs are compared with ours on a few sentences.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch

from megatron_effmlm.cli import no_such_dir
from megatron_effmlm.hf.convert import TARGETS, ConversionError, check_exportable, hf_config, to_hf

VERIFY_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Anarchism is a political philosophy and movement that is sceptical of authority.",
]


class ExportError(ConversionError):
    pass


# Written last into every export: the files this tool wrote. A later export replaces only a
# folder that holds nothing else; no other folder is ever deleted or written into.
EXPORT_MARK = "effmlm_export.json"


def check_output_dir(output_dir: str) -> None:
    """Refuse an --output-dir this tool may not replace: a file, or a non-empty folder that is
    not an earlier export of it (or holds files it did not write)."""
    if not os.path.exists(output_dir):
        return
    if not os.path.isdir(output_dir):
        raise ExportError(f"--output-dir {output_dir} is a file; choose a new folder")
    present = set(os.listdir(output_dir))
    if not present:
        return
    mark = os.path.join(output_dir, EXPORT_MARK)
    if not os.path.isfile(mark):
        raise ExportError(f"--output-dir {output_dir} is not empty and is not an earlier export of this tool "
                          f"(no {EXPORT_MARK}); choose a new or empty folder")
    import json

    try:
        written = set(json.load(open(mark))["files"])
    except (ValueError, KeyError, TypeError):
        raise ExportError(f"{mark}: unreadable; choose a new or empty --output-dir") from None
    other = sorted(present - written - {EXPORT_MARK})
    if other:
        raise ExportError(f"--output-dir {output_dir} holds files an earlier export did not write "
                          f"({', '.join(other[:5])}); choose a new or empty folder")


def _replace_dir(tmp: str, output_dir: str) -> None:
    """Put `tmp` at `output_dir` (checked by check_output_dir); an earlier export is moved
    aside first and deleted only once the new one is in place."""
    import tempfile

    if os.path.isdir(output_dir) and os.listdir(output_dir):
        aside = tempfile.mkdtemp(prefix=os.path.basename(output_dir) + ".old", dir=os.path.dirname(tmp))
        os.replace(output_dir, aside)  # over an empty folder of our own
        os.replace(tmp, output_dir)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, output_dir)  # none, or an empty folder


def find_checkpoint(root: str):
    """(checkpoint directory, its common state) for `root` (a --save folder or one iteration):
    the newest complete one, as --load picks it (a partial or torn latest one is skipped with a
    warning naming it)."""
    from megatron.core import dist_checkpointing

    from megatron_effmlm.checkpoint import dist_ckpt

    if missing := no_such_dir("--checkpoint", root):
        raise ExportError(missing)
    try:
        candidates = dist_ckpt.find_candidates(root)
    except dist_ckpt.CheckpointError as e:
        raise ExportError(str(e)) from None
    if not candidates:
        raise ExportError(f"--checkpoint {root} is not a checkpoint: no latest_checkpointed_iteration.txt "
                          "and no dist_checkpointing metadata (point it at a --save folder or one iter_* folder)")
    for n, path in enumerate(candidates):
        if not dist_ckpt._is_complete(path):
            dist_ckpt._warn(f"skipping checkpoint {path}: partial or missing (no dist_checkpointing metadata); "
                            "falling back to the previous one")
            continue
        try:
            dist_ckpt.check_safe(path)  # before anything reads a pickle of it
            common = dist_checkpointing.load_common_state_dict(path)
        except dist_ckpt.CheckpointError:
            raise
        except dist_ckpt._READ_ERRORS as e:
            dist_ckpt._warn(f"skipping checkpoint {path}: corrupt or unreadable ({dist_ckpt._describe(e)}); "
                            "falling back to the previous one")
            continue
        if "run_info" not in common:
            raise ExportError(f"checkpoint {path} records no model configuration (run_info): it was saved by an "
                              "older version; continue it for one step with this version and export that")
        if n:
            dist_ckpt._warn(f"exporting checkpoint {path} instead of the latest {candidates[0]}")
        return path, common
    raise ExportError(f"--checkpoint {root}: no complete, readable checkpoint (tried {', '.join(candidates)})")


def load_model(path: str, common: dict, keep_decoder: bool = False):
    """Our MLMModel (one process, TP=PP=1) with the checkpoint's weights; 3ML's decoder is left
    out unless `keep_decoder` (the held-out evaluation runs 3ML's own inference path)."""
    from megatron.core import dist_checkpointing

    from megatron_effmlm.checkpoint import dist_ckpt
    from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_effmlm.model.builder import build_model, build_transformer_config
    from megatron_effmlm.parallel.init import initialize_distributed

    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        initialize_distributed(1, 1, None, seed=1234)
    elif parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ExportError("export runs on one process (TP=PP=1); it reshards any saved layout itself")
    # Loading restores RNG states saved on this layout: keep the caller's (tests share a process).
    rng = torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states()
    m = dict(common["run_info"]["model"])
    # The saved word embedding's rows: padded for the layout that wrote it.
    meta = dist_checkpointing.load_tensors_metadata(path)
    rows = meta["embedding.word_embeddings.weight"].global_shape[0]
    m.update(vocab_size=rows, make_vocab_size_divisible_by=1, transformer_impl="local",
             hidden_dropout=0.0, attention_dropout=0.0)
    if not keep_decoder:
        m.update(decoder_layers=0)
    mc = ModelConfig(**m)
    tc = build_transformer_config(mc, ParallelConfig(), PrecisionConfig())
    model = build_model(mc, ParallelConfig(), tc, wrap_ddp=False)[0]
    dist_ckpt.load_checkpoint(path, [model], None, None, {})
    torch.set_rng_state(rng[0])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng[1])
    model.eval()
    return model


@torch.no_grad()
def our_outputs(model, input_ids, padding_mask):
    """(MLM logits [m, V], final hidden states [m, h]) of our model at the real positions
    (row-major), by its own forward."""
    b, T = input_ids.shape
    out = model(input_ids=input_ids, position_ids=torch.arange(T).expand(b, T), padding_mask=padding_mask,
                loss_mask=padding_mask, labels=input_ids, return_logits=True)
    return out.logits, out.hidden


@torch.no_grad()
def hf_outputs(hf_model, input_ids, padding_mask, encoder_only: bool):
    out = hf_model(input_ids=input_ids, attention_mask=padding_mask, output_hidden_states=not encoder_only)
    sel = padding_mask.bool()
    hidden = out.last_hidden_state if encoder_only else out.hidden_states[-1]
    return (None if encoder_only else out.logits[sel]), hidden[sel]


def batch_of(tokenizer, texts, seq_length: int):
    """Right-padded [CLS] ids [SEP] rows, as the trainer builds them."""
    rows = [[tokenizer.cls] + tokenizer.tokenize(t)[: seq_length - 2] + [tokenizer.sep] for t in texts]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _model_card(info: dict, common: dict, target: str, cls_name: str, encoder_only: bool, diff: float) -> str:
    m, T = info["model"], info["model"]["seq_length"]
    it, samples, flops = int(common.get("iteration", 0)), int(common.get("consumed_samples", 0)), \
        float(common.get("train_flops", 0.0))
    lines = [
        f"# {cls_name} exported from megatron-effmlm", "",
    ]
    if encoder_only:
        lines += [
            "**Encoder only: this model has no usable MLM head.** It was pre-trained with 3ML, whose LM head",
            "reads the output of decoder layers that are pre-training machinery and are not exported.",
            "Load it with `AutoModel` or `AutoModelForSequenceClassification` (a new head) for fine-tuning.", "",
        ]
    lines += [
        "| | |", "|---|---|",
        f"| method | `{info['method']}` {info.get('method_options') or ''} |",
        f"| data | {' '.join(info.get('data_path', []))} |",
        f"| steps | {it} (global batch {info.get('global_batch_size')}) |",
        f"| tokens | {samples * T:,} ({samples:,} sequences of {T} positions, padding included) |",
        f"| training FLOPs | {flops:.3e} (model FLOPs, forward + backward) |",
        f"| masking rate | {info.get('mask_prob')} |",
        f"| architecture | `--model-arch {m.get('model_arch', 'megatron-bert')}`: {m['num_layers']} layers, hidden "
        f"{m['hidden_size']}, {m['num_attention_heads']} heads, FFN {m['ffn_hidden_size']} |",
        f"| exported as | `{cls_name}` (`--target {target}`) |",
        f"| check | max abs difference to the megatron-core model on sample text: {diff:.2e} (fp32) |",
    ]
    if m.get("bert_binary_head"):
        lines += ["", "The sentence-order head (`--bert-binary-head`) is not exported."]
    return "\n".join(lines) + "\n"


def export(checkpoint: str, output_dir: str, target: Optional[str] = None, tokenizer_dir: Optional[str] = None,
           verify_tol: float = 1e-4) -> dict:
    """Write `output_dir` atomically; returns {"target", "class", "max_abs_diff", "encoder_only"}."""
    import transformers

    from megatron_effmlm.data.errors import DataError
    from megatron_effmlm.data.tokenizer import EffMLMTokenizer

    check_output_dir(output_dir)
    path, common = find_checkpoint(checkpoint)
    info = common["run_info"]
    tok_dir = tokenizer_dir or info["tokenizer"]["dir"]
    try:
        tokenizer = EffMLMTokenizer.from_dir(tok_dir)
    except DataError as e:
        raise ExportError(f"{e} (the checkpoint's tokenizer; pass --tokenizer-dir)") from None
    if tokenizer.unique_identifiers["tokenizer_sha1"] != info["tokenizer"]["sha1"]:
        raise ExportError(f"--tokenizer-dir {tok_dir}: tokenizer.json differs from the one checkpoint {path} was "
                          "trained with (sha1 mismatch)")
    arch = info["model"].get("model_arch", "megatron-bert")
    target = target or arch
    check_exportable(info["model"], target)
    encoder_only = bool(info["model"].get("decoder_layers"))  # 3ML-like: the decoder is pre-training machinery
    specials = {"pad": tokenizer.pad, "cls": tokenizer.cls, "sep": tokenizer.sep}

    model = load_model(path, common)
    # The tokenizer's vocabulary (our rows beyond it are TP padding), or an imported model's own size.
    vocab = int((common.get("hf_import") or {}).get("vocab_size") or tokenizer.vocab_size)
    hf_cfg = hf_config(info["model"], target, vocab, specials, encoder_only)
    sd = to_hf(model.state_dict(), info["model"], target, vocab, tokenizer.pad, encoder_only,
               common.get("hf_import"))
    cls_name = TARGETS[target][2 if encoder_only else 1]
    hf_cls = getattr(transformers, cls_name)
    hf_model = hf_cls(hf_cfg, add_pooling_layer=False) if encoder_only else hf_cls(hf_cfg)
    hf_model.load_state_dict(sd, strict=True)
    hf_model.eval()

    import json
    import tempfile

    output_dir = output_dir.rstrip("/") or output_dir
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(output_dir) + ".tmp", dir=parent)  # ours alone
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is not what a model folder should be
    try:
        hf_model.save_pretrained(tmp)  # config.json + model.safetensors
        extra = {} if target != "roberta" else {"model_input_names": ["input_ids", "attention_mask"]}  # one type
        tokenizer.hf_tokenizer(model_max_length=info["model"]["seq_length"], **extra).save_pretrained(tmp)
        # The check runs on what was written: transformers loads the folder as a user would.
        reloaded = (transformers.AutoModel if encoder_only else transformers.AutoModelForMaskedLM).from_pretrained(tmp)
        reloaded.eval()
        ids, mask = batch_of(tokenizer, VERIFY_TEXT, info["model"]["seq_length"])
        logits, hidden = our_outputs(model, ids, mask)
        hf_logits, hf_hidden = hf_outputs(reloaded, ids, mask, encoder_only)
        diff = float((hidden - hf_hidden).abs().max()) if encoder_only else \
            float((logits[:, :vocab] - hf_logits).abs().max())
        if not diff <= verify_tol:
            raise ExportError(f"exported {cls_name} differs from the checkpoint's model by {diff:.3e} "
                              f"(> {verify_tol}) on sample text; not written")
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_model_card(info, common, target, cls_name, encoder_only, diff))
        with open(os.path.join(tmp, EXPORT_MARK), "w") as f:
            json.dump({"files": sorted(os.listdir(tmp)), "checkpoint": os.path.abspath(path)}, f, indent=1)
        check_output_dir(output_dir)  # again: it may have changed while we worked
        _replace_dir(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"target": target, "class": cls_name, "max_abs_diff": diff, "encoder_only": encoder_only,
            "checkpoint": path}
