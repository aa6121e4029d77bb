"""Weight names and layouts between our MLMModel (one process, TP=1) and transformers'
BERT family: `MegatronBertForMaskedLM` (pre-LN, `--model-arch megatron-bert`), `BertForMaskedLM`
and `RobertaForMaskedLM` (post-LN, `--model-arch bert|roberta`), and their encoder-only
`*Model` classes (3ML's export).

Both directions are exact copies except for three documented layouts:
- megatron-core's fused QKV holds, per attention head, [q_h; k_h; v_h] rows; HF has separate
  query/key/value matrices.
- our vocabulary is padded for TP (`--make-vocab-size-divisible-by`); HF gets the tokenizer's.
- RoBERTa's position ids start at padding_idx + 1; rows 0..padding_idx are never read.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

# target -> (HF model_type, MaskedLM class, encoder class, base prefix, MLM head prefix)
TARGETS = {
    "megatron-bert": ("megatron-bert", "MegatronBertForMaskedLM", "MegatronBertModel", "bert.", "cls.predictions."),
    "bert": ("bert", "BertForMaskedLM", "BertModel", "bert.", "cls.predictions."),
    "roberta": ("roberta", "RobertaForMaskedLM", "RobertaModel", "roberta.", "lm_head."),
}
_HEAD = {  # ours -> HF, relative to the head prefix
    "cls.predictions.": {"lm_head.dense": "transform.dense", "lm_head.layer_norm": "transform.LayerNorm"},
    "lm_head.": {"lm_head.dense": "dense", "lm_head.layer_norm": "layer_norm"},
}


class ConversionError(ValueError):
    """A checkpoint or HF model that cannot be converted exactly; the message says why."""


def position_offset(target: str, pad_id: int) -> int:
    return pad_id + 1 if target == "roberta" else 0


def _layer_pairs(target: str, i: int):
    """(ours, HF) module-name pairs of layer i that copy as they are (weight and bias)."""
    o, h = f"encoder.layers.{i}.", f"encoder.layer.{i}."
    pairs = [(o + "self_attention.linear_proj", h + "attention.output.dense"),
             (o + "mlp.linear_fc1", h + "intermediate.dense"), (o + "mlp.linear_fc2", h + "output.dense")]
    if target == "megatron-bert":
        pairs += [(o + "input_layernorm", h + "attention.ln"), (o + "pre_mlp_layernorm", h + "ln")]
    else:
        pairs += [(o + "post_attention_layernorm", h + "attention.output.LayerNorm"),
                  (o + "post_mlp_layernorm", h + "output.LayerNorm")]
    return pairs


def check_exportable(model_cfg: dict, target: str) -> None:
    """Raise ConversionError unless the model is exactly representable as `target`."""
    if target not in TARGETS:
        raise ConversionError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    arch = model_cfg.get("model_arch", "megatron-bert")
    if (arch == "megatron-bert") != (target == "megatron-bert"):
        kind = "pre-LayerNorm (--model-arch megatron-bert)" if arch == "megatron-bert" else \
            f"post-LayerNorm (--model-arch {arch})"
        cls = TARGETS[target][1]
        raise ConversionError(
            f"the checkpoint's model is {kind} but {cls} is "
            f"{'pre' if target == 'megatron-bert' else 'post'}-LayerNorm: it cannot be exported exactly; "
            f"use --target {'megatron-bert' if arch == 'megatron-bert' else 'bert or roberta'}")
    if model_cfg.get("position_embedding_type", "learned_absolute") != "learned_absolute":
        raise ConversionError(
            f"--position-embedding-type {model_cfg['position_embedding_type']}: {TARGETS[target][1]} has learned "
            "absolute positions only; a RoPE model cannot be exported exactly")
    if target == "roberta" and _num_types(model_cfg) > 1:
        raise ConversionError(
            f"the model has {_num_types(model_cfg)} token types (--bert-binary-head or --num-tokentypes) but "
            "RobertaForMaskedLM has one; use --target bert")


def _num_types(model_cfg: dict) -> int:
    return model_cfg.get("num_tokentypes") or (2 if model_cfg.get("bert_binary_head") else 0)


def hf_config(model_cfg: dict, target: str, vocab_size: int, specials: Dict[str, int], encoder_only: bool):
    """transformers config of the exported model."""
    import transformers

    m = model_cfg
    pad = specials["pad"]
    types = _num_types(m) or (1 if target == "roberta" else 2)  # HF always has a token-type table
    kw = dict(
        vocab_size=vocab_size, hidden_size=m["hidden_size"], num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_attention_heads"], intermediate_size=m["ffn_hidden_size"], hidden_act="gelu",
        hidden_dropout_prob=m["hidden_dropout"], attention_probs_dropout_prob=m["attention_dropout"],
        max_position_embeddings=m["max_position_embeddings"] + position_offset(target, pad),
        type_vocab_size=types, layer_norm_eps=m["layernorm_epsilon"], initializer_range=m["init_method_std"],
        pad_token_id=pad, bos_token_id=specials["cls"], eos_token_id=specials["sep"], tie_word_embeddings=True,
        position_embedding_type="absolute",
    )
    cls = {"megatron-bert": transformers.MegatronBertConfig, "bert": transformers.BertConfig,
           "roberta": transformers.RobertaConfig}[target]
    cfg = cls(**kw)
    cfg.architectures = [TARGETS[target][2 if encoder_only else 1]]
    return cfg


def to_hf(ours: Dict[str, Tensor], model_cfg: dict, target: str, vocab_size: int, pad_id: int,
          encoder_only: bool, extra: Optional[dict] = None) -> Dict[str, Tensor]:
    """Our TP=1 state dict -> the HF model's state dict (every key, tied ones included)."""
    _, _, _, base, head = TARGETS[target]
    if encoder_only:
        base = ""
    h, nh = model_cfg["hidden_size"], model_cfg["num_attention_heads"]
    hd = h // nh
    out = {}

    def copy(src, dst):
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = ours[f"{src}.{suffix}"]

    word = ours["embedding.word_embeddings.weight"][:vocab_size]
    out[base + "embeddings.word_embeddings.weight"] = word
    pos = ours["embedding.position_embeddings.weight"]
    off = position_offset(target, pad_id)
    if off:  # rows below the offset are never read: zeros, or the imported model's own
        low = (extra or {}).get("position_rows_below_offset")
        low = low if low is not None and low.shape[0] == off else pos.new_zeros(off, h)
        pos = torch.cat([low, pos])
    out[base + "embeddings.position_embeddings.weight"] = pos
    types = ours.get("embedding.tokentype_embeddings.weight")
    if types is None:  # our model adds none: an all-zero table is the same function
        types = word.new_zeros(1 if target == "roberta" else 2, h)
    out[base + "embeddings.token_type_embeddings.weight"] = types
    if target != "megatron-bert":
        copy("embedding.embedding_dropout.norm", base + "embeddings.LayerNorm")
    for i in range(model_cfg["num_layers"]):
        for src, dst in _layer_pairs(target, i):
            copy(src, base + dst)
        o, hl = f"encoder.layers.{i}.self_attention.linear_qkv.", f"{base}encoder.layer.{i}.attention.self."
        w = ours[o + "weight"].view(nh, 3, hd, h)
        b = ours[o + "bias"].view(nh, 3, hd)
        for j, name in enumerate(("query", "key", "value")):
            out[hl + name + ".weight"] = w[:, j].reshape(h, h)
            out[hl + name + ".bias"] = b[:, j].reshape(h)
    if target == "megatron-bert":
        copy("encoder.final_layernorm", base + "encoder.ln")
    if not encoder_only:
        for src, dst in _HEAD[head].items():
            copy(src, head + dst)
        bias = ours["output_layer.bias"][:vocab_size]
        out[head + "bias"] = bias
        out[head + "decoder.weight"] = word  # tied
        out[head + "decoder.bias"] = bias
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_hf(theirs: Dict[str, Tensor], hf_cfg, target: str, padded_vocab: int) -> tuple:
    """An HF *ForMaskedLM state dict -> (our TP=1 state dict, extra tensors HF has and we do not read)."""
    _, _, _, base, head = TARGETS[target]
    h, nh = hf_cfg.hidden_size, hf_cfg.num_attention_heads
    ours, extra = {}, {}

    def copy(dst, src):
        for suffix in ("weight", "bias"):
            ours[f"{dst}.{suffix}"] = theirs[f"{src}.{suffix}"]

    word = theirs[base + "embeddings.word_embeddings.weight"]
    V = word.shape[0]
    ours["embedding.word_embeddings.weight"] = torch.cat([word, word.new_zeros(padded_vocab - V, h)])
    pos = theirs[base + "embeddings.position_embeddings.weight"]
    off = position_offset(target, hf_cfg.pad_token_id)
    if off:
        extra["position_rows_below_offset"] = pos[:off].clone()
    ours["embedding.position_embeddings.weight"] = pos[off:]
    ours["embedding.tokentype_embeddings.weight"] = theirs[base + "embeddings.token_type_embeddings.weight"]
    if target != "megatron-bert":
        copy("embedding.embedding_dropout.norm", base + "embeddings.LayerNorm")
    for i in range(hf_cfg.num_hidden_layers):
        for dst, src in _layer_pairs(target, i):
            copy(dst, base + src)
        o, hl = f"encoder.layers.{i}.self_attention.linear_qkv.", f"{base}encoder.layer.{i}.attention.self."
        qkv = [theirs[hl + n + ".weight"].view(nh, -1, h) for n in ("query", "key", "value")]
        ours[o + "weight"] = torch.stack(qkv, 1).reshape(3 * h, h)
        qkv = [theirs[hl + n + ".bias"].view(nh, -1) for n in ("query", "key", "value")]
        ours[o + "bias"] = torch.stack(qkv, 1).reshape(3 * h)
    if target == "megatron-bert":
        copy("encoder.final_layernorm", base + "encoder.ln")
    for dst, src in _HEAD[head].items():
        copy(dst, head + src)
    bias = theirs[head + "bias"]
    ours["output_layer.bias"] = torch.cat([bias, bias.new_zeros(padded_vocab - V)])
    return {k: v.detach().clone().contiguous() for k, v in ours.items()}, extra
