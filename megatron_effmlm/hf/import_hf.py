"""Import a transformers BertForMaskedLM / RobertaForMaskedLM / MegatronBertForMaskedLM folder
as a checkpoint that `--load` continues from (any TP/PP layout, any method).

Output (a --save folder, written under a temporary name and renamed when complete):
    OUT/iter_0000000/    weights only (a fresh optimizer starts on --load)
    OUT/latest_checkpointed_iteration.txt
    OUT/tokenizer/       the folder's tokenizer in this project's format (--tokenizer-dir)
The flags that rebuild the same model are printed and written to OUT/model_args.txt.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from megatron_effmlm.cli import no_such_dir
from megatron_effmlm.hf.convert import TARGETS, ConversionError, from_hf


class HFImportError(ConversionError):
    pass


TOKENIZER_FILES = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"))
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TYPE_TO_TARGET = {v[0]: k for k, v in TARGETS.items()}


def read_hf_config(folder: str):
    import transformers

    if missing := no_such_dir("--hf-dir", folder):
        raise HFImportError(missing)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise HFImportError(f"--hf-dir {folder} is not a Hugging Face model folder: no config.json")
    cfg = transformers.AutoConfig.from_pretrained(folder)
    target = _TYPE_TO_TARGET.get(cfg.model_type)
    if target is None:
        raise HFImportError(f"{folder}/config.json: model_type {cfg.model_type!r} is not one of "
                           f"{', '.join(_TYPE_TO_TARGET)}")
    why = []
    if cfg.hidden_act != "gelu":
        why.append(f"hidden_act {cfg.hidden_act!r} (ours: exact GELU, 'gelu')")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        why.append(f"position_embedding_type {cfg.position_embedding_type!r} (ours: absolute)")
    if getattr(cfg, "is_decoder", False):
        why.append("is_decoder true")
    if not getattr(cfg, "tie_word_embeddings", True):
        why.append("tie_word_embeddings false (ours ties the output layer to the word embedding)")
    if why:
        raise HFImportError(f"{folder}/config.json cannot be imported exactly: {'; '.join(why)}")
    return cfg, target


def tokenizer_to_ours(folder: str, out_dir: str) -> None:
    """The folder's fast tokenizer as this project's tokenizer directory (tokenizer.json + meta)."""
    import transformers

    from megatron_effmlm.data.tokenizer import FORMAT_VERSION, HF_FILE, META_FILE

    # transformers builds an empty tokenizer from config.json alone: look for the files first.
    files = [f for f in TOKENIZER_FILES if all(os.path.isfile(os.path.join(folder, n)) for n in f)]
    if not files:
        raise HFImportError(f"--hf-dir {folder} has no tokenizer: none of "
                            f"{', '.join(' + '.join(f) for f in TOKENIZER_FILES)}")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds for a missing or broken tokenizer
        raise HFImportError(f"--hf-dir {folder}: no usable tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise HFImportError(f"--hf-dir {folder}: the tokenizer is not a fast (tokenizers) one; save it with "
                           "tokenizer.json")
    model_kind = json.loads(backend.to_str())["model"]["type"]
    kind = {"WordPiece": "wordpiece", "BPE": "bpe", "Unigram": "sp-unigram"}.get(model_kind)
    roles = {"cls": tok.cls_token, "sep": tok.sep_token, "pad": tok.pad_token, "mask": tok.mask_token,
             "unk": tok.unk_token}
    missing = [r for r, t in roles.items() if t is None]
    if kind is None or missing:
        raise HFImportError(f"--hf-dir {folder}: tokenizer model {model_kind} / missing special tokens {missing}: "
                           "need WordPiece, BPE or Unigram with [CLS]/[SEP]/[PAD]/[MASK]/[UNK] roles")
    style = "bert" if tok.cls_token == "[CLS]" else "roberta"
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    backend.save(os.path.join(tmp, HF_FILE))
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "style": style,
            "lowercase": bool(getattr(tok, "do_lower_case", False)),
            "vocab_size": backend.get_vocab_size(with_added_tokens=True),
            "special_tokens": {r: {"token": t, "id": backend.token_to_id(t)} for r, t in roles.items()},
            "files": {"hf": HF_FILE}, "imported_from": os.path.abspath(folder)}
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def import_hf(folder: str, output: str, seq_length: Optional[int] = None, max_tp: int = 8) -> list:
    """Write the checkpoint under `output`; returns the model flags for pretrain_effmlm.py."""
    hf_cfg, target = read_hf_config(folder)
    if os.path.exists(output):
        raise HFImportError(f"--output {output} exists; choose a new folder")
    # Everything is written under a temporary name and renamed at the end: no half-imported folder.
    tmp = f"{output.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        flags = _import(folder, output, tmp, hf_cfg, target, seq_length, max_tp)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return flags


def _import(folder, output, tmp, hf_cfg, target, seq_length, max_tp):
    import transformers

    from megatron_effmlm.checkpoint.dist_ckpt import save_checkpoint
    from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig, pad_vocab_size
    from megatron_effmlm.data.tokenizer import EffMLMTokenizer
    from megatron_effmlm.model.builder import build_model, build_transformer_config
    from megatron_effmlm.parallel.init import initialize_distributed

    tokenizer_to_ours(folder, os.path.join(tmp, "tokenizer"))
    tokenizer = EffMLMTokenizer.from_dir(os.path.join(tmp, "tokenizer"))
    tok_dir = os.path.abspath(os.path.join(output, "tokenizer"))  # where it will be

    if not any(os.path.isfile(os.path.join(folder, n)) for n in WEIGHT_FILES):
        raise HFImportError(f"--hf-dir {folder} has no weights: none of {', '.join(WEIGHT_FILES)}")
    try:  # transformers reads .bin files with torch.load(weights_only=True): no arbitrary objects
        hf_model, info = transformers.AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    except Exception as e:  # a truncated or corrupt weights file: safetensors/torch/transformers errors
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise HFImportError(f"--hf-dir {folder}: cannot read the weights ({type(e).__name__}: {first})") from None
    if info["missing_keys"]:
        raise HFImportError(f"--hf-dir {folder}: weights missing from the folder ({', '.join(info['missing_keys'][:4])}"
                           " ...); an encoder-only model has no MLM head to continue pre-training with")
    off = hf_cfg.pad_token_id + 1 if target == "roberta" else 0
    max_pos = hf_cfg.max_position_embeddings - off
    seq_length = seq_length or min(max_pos, 512)
    # Pad the vocabulary so that every TP size up to max_tp allocates the same rows (--vocab-size below):
    # loading would pad or trim them anyway, but then runs on different TP sizes see different padding.
    padded = pad_vocab_size(hf_cfg.vocab_size, 128, max_tp)
    if tokenizer.vocab_size > hf_cfg.vocab_size:
        raise HFImportError(f"--hf-dir {folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                           f"vocab_size is {hf_cfg.vocab_size}")
    mc = ModelConfig(
        num_layers=hf_cfg.num_hidden_layers, hidden_size=hf_cfg.hidden_size,
        num_attention_heads=hf_cfg.num_attention_heads, ffn_hidden_size=hf_cfg.intermediate_size,
        seq_length=seq_length, max_position_embeddings=max_pos, vocab_size=padded,
        make_vocab_size_divisible_by=128, hidden_dropout=hf_cfg.hidden_dropout_prob,
        attention_dropout=hf_cfg.attention_probs_dropout_prob, init_method_std=hf_cfg.initializer_range,
        layernorm_epsilon=hf_cfg.layer_norm_eps, transformer_impl="local", model_arch=target,
        num_tokentypes=hf_cfg.type_vocab_size,
    )
    ours, extra = from_hf(hf_model.state_dict(), hf_cfg, target, padded)

    initialize_distributed(1, 1, None, seed=1234)
    tc = build_transformer_config(mc, ParallelConfig(), PrecisionConfig())
    model = build_model(mc, ParallelConfig(), tc, wrap_ddp=False)[0]
    res = model.load_state_dict(ours, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("_extra_state")]
    if missing or res.unexpected_keys:
        raise HFImportError(f"internal: weights not matched: missing {missing[:4]}, unexpected {res.unexpected_keys[:4]}")
    extra["vocab_size"] = hf_cfg.vocab_size  # rows the export writes back (may exceed the tokenizer's)

    from megatron_effmlm.config import DataConfig, OptimConfig, RunConfig, TrainConfig
    from megatron_effmlm.checkpoint.run_info import run_info

    train = TrainConfig()
    train.global_batch_size = 0  # the record of a run that took no step (the checks refuse 0 on a real run)
    run = RunConfig(mc, ParallelConfig(), PrecisionConfig(), OptimConfig(),
                    DataConfig(data_path=[f"imported from {os.path.abspath(folder)}"], mask_prob=None), train)
    info = run_info(run, tokenizer)
    info["tokenizer"]["dir"] = tok_dir
    save_checkpoint(tmp, 0, [model], None, None, {
        "consumed_samples": 0, "train_flops": 0.0, "run_info": info, "hf_import": extra})
    flags = ["--model-arch", target, "--num-layers", mc.num_layers, "--hidden-size", mc.hidden_size,
             "--num-attention-heads", mc.num_attention_heads, "--ffn-hidden-size", mc.ffn_hidden_size,
             "--seq-length", mc.seq_length, "--max-position-embeddings", mc.max_position_embeddings,
             "--vocab-size", padded, "--num-tokentypes", mc.num_tokentypes, "--layernorm-epsilon",
             mc.layernorm_epsilon, "--transformer-impl", "local", "--tokenizer-dir", tok_dir, "--load", os.path.abspath(output)]
    flags = [str(f) for f in flags]
    with open(os.path.join(tmp, "model_args.txt"), "w") as f:
        f.write(" ".join(flags) + "\n")
    return flags
