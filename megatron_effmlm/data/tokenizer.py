"""Tokenizers for MLM pre-training: training them and the one interface everything uses.

Four kinds, all run through one HF ``tokenizers.Tokenizer`` saved as ``tokenizer.json``:

- ``wordpiece``: BERT WordPiece (HF tokenizers), "##" marks word continuations.
- ``bpe``: byte-level BPE as in RoBERTa/GPT-2 (HF tokenizers), "Ġ" marks word starts.
- ``sp-unigram`` / ``sp-bpe``: trained by sentencepiece (its ``spm.model`` is kept next to it)
  and converted to the HF format; "▁" marks word starts.

Special tokens take ids 0-4, fixed per style and recorded in ``effmlm_tokenizer.json``:
bert: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4; roberta: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4.
"""

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy

from megatron_effmlm.data.errors import DataError

KINDS = ("wordpiece", "bpe", "sp-unigram", "sp-bpe")
STYLES = ("bert", "roberta")
DEFAULT_STYLE = {"wordpiece": "bert", "bpe": "roberta", "sp-unigram": "roberta", "sp-bpe": "roberta"}
# Role -> token, in id order (the first is id 0).
SPECIAL_TOKENS = {
    "bert": OrderedDict(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]"),
    "roberta": OrderedDict(cls="<s>", pad="<pad>", sep="</s>", unk="<unk>", mask="<mask>"),
}
# What marks a word boundary in each kind's pieces.
_WORD_START_PREFIX = {"bpe": "\u0120", "sp-unigram": "\u2581", "sp-bpe": "\u2581"}
_CONTINUATION_PREFIX = "##"

META_FILE = "effmlm_tokenizer.json"
HF_FILE = "tokenizer.json"
SPM_FILE = "spm.model"
FORMAT_VERSION = 1


def _post_processor(style: str, specials: "OrderedDict[str, str]", ids: Dict[str, int]):
    from tokenizers import processors

    cls_tok, sep_tok = specials["cls"], specials["sep"]
    pair = (
        f"{cls_tok} $A {sep_tok} $B:1 {sep_tok}:1"
        if style == "bert"
        else f"{cls_tok} $A {sep_tok} {sep_tok} $B {sep_tok}"
    )
    return processors.TemplateProcessing(
        single=f"{cls_tok} $A {sep_tok}",
        pair=pair,
        special_tokens=[(cls_tok, ids["cls"]), (sep_tok, ids["sep"])],
    )


# --------------------------------------------------------------------------------------------
# Training


def _train_hf(texts: Iterable[str], kind: str, vocab_size: int, lowercase: bool, specials):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    special_list = list(specials.values())
    if kind == "wordpiece":
        tok = Tokenizer(
            models.WordPiece(unk_token=specials["unk"], continuing_subword_prefix=_CONTINUATION_PREFIX)
        )
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix=_CONTINUATION_PREFIX)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=special_list, min_frequency=2,
            continuing_subword_prefix=_CONTINUATION_PREFIX, show_progress=False,
        )
    else:  # byte-level BPE
        tok = Tokenizer(models.BPE())
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        # A prefix space makes the first word of a text look like every other word ("Ġword"),
        # which whole-word masking relies on; the decoder strips it again.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special_list, min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _train_sentencepiece(
    texts: Iterable[str], kind: str, vocab_size: int, lowercase: bool, specials, spm_path: str
) -> None:
    import sentencepiece as spm

    ids = {role: i for i, role in enumerate(specials)}

    def lines() -> Iterator[str]:
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_writer=model,
        model_type="unigram" if kind == "sp-unigram" else "bpe",
        vocab_size=vocab_size,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        pad_id=ids["pad"], unk_id=ids["unk"], bos_id=ids["cls"], eos_id=ids["sep"],
        pad_piece=specials["pad"], unk_piece=specials["unk"],
        bos_piece=specials["cls"], eos_piece=specials["sep"],
        user_defined_symbols=[specials["mask"]],  # takes the next free id, 4
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary, not an error
        max_sentence_length=1 << 16,  # Wikipedia paragraphs exceed the 4 KB default
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    with open(spm_path, "wb") as f:
        f.write(model.getvalue())


def _sentencepiece_merges(vocab: Dict[str, int], skip: set) -> List[tuple]:
    """BPE merges for a sentencepiece BPE model: a piece's id is its merge rank."""
    merges = []
    for piece, rank in vocab.items():
        if piece in skip:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def sentencepiece_to_hf(spm_path: str, specials: "OrderedDict[str, str]"):
    """Convert a sentencepiece model to an equivalent HF ``tokenizers.Tokenizer``."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = sentencepiece_model_pb2.ModelProto()
    with open(spm_path, "rb") as f:
        proto.ParseFromString(f.read())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        tok = Tokenizer(models.Unigram(pieces, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    elif proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        merges = _sentencepiece_merges(vocab, set(specials.values()))
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True))
    else:
        raise DataError(f"{spm_path}: unsupported sentencepiece model type {proto.trainer_spec.model_type}")
    steps = []
    if proto.normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    # sentencepiece's remove_extra_whitespaces
    steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    return tok


def train_tokenizer(
    texts: Iterable[str],
    kind: str,
    vocab_size: int,
    output_dir: str,
    lowercase: bool = False,
    style: Optional[str] = None,
    extra_meta: Optional[dict] = None,
) -> "EffMLMTokenizer":
    """Train a tokenizer of ``kind`` on ``texts`` (one document each) and write it to ``output_dir``."""
    if kind not in KINDS:
        raise DataError(f"--tokenizer-type must be one of {', '.join(KINDS)}, got {kind!r}")
    style = style or DEFAULT_STYLE[kind]
    if style not in STYLES:
        raise DataError(f"--style must be one of {', '.join(STYLES)}, got {style!r}")
    min_vocab = len(SPECIAL_TOKENS[style]) + (256 if kind == "bpe" else 1)
    if vocab_size < min_vocab:
        raise DataError(f"--vocab-size {vocab_size} is too small for {kind}: need at least {min_vocab}")
    specials = SPECIAL_TOKENS[style]
    os.makedirs(output_dir, exist_ok=True)
    # Written into a folder of its own inside output_dir, moved into place only when complete:
    # a failed training leaves a tokenizer already there as it was.
    stage = tempfile.mkdtemp(prefix=".training", dir=output_dir)
    try:
        tok = _train_into(texts, kind, vocab_size, lowercase, style, specials, stage, extra_meta)
        names = sorted(os.listdir(stage))
        if os.path.exists(os.path.join(output_dir, META_FILE)):
            os.remove(os.path.join(output_dir, META_FILE))  # incomplete until the new one is in
        for name in names:
            if name != META_FILE:
                os.replace(os.path.join(stage, name), os.path.join(output_dir, name))
        os.replace(os.path.join(stage, META_FILE), os.path.join(output_dir, META_FILE))  # marks it complete
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return EffMLMTokenizer.from_dir(output_dir)


def _train_into(texts, kind, vocab_size, lowercase, style, specials, output_dir, extra_meta):
    from tokenizers import AddedToken

    files = {"hf": HF_FILE}
    if kind.startswith("sp-"):
        spm_path = os.path.join(output_dir, SPM_FILE)
        _train_sentencepiece(texts, kind, vocab_size, lowercase, specials, spm_path)
        tok = sentencepiece_to_hf(spm_path, specials)
        files["sentencepiece"] = SPM_FILE
    else:
        tok = _train_hf(texts, kind, vocab_size, lowercase, specials)
    # Specials are matched in raw text and never split (the same id as in the vocabulary).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    ids = {}
    for i, (role, token) in enumerate(specials.items()):
        ids[role] = tok.token_to_id(token)
        if ids[role] != i:  # the layout is part of the format; never silently shift it
            raise DataError(f"{kind} training put special token {token} at id {ids[role]}, expected {i}")
    tok.post_processor = _post_processor(style, specials, ids)
    tok.save(os.path.join(output_dir, HF_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "style": style,
        "lowercase": bool(lowercase),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": vocab_size,
        "special_tokens": {role: {"token": specials[role], "id": ids[role]} for role in specials},
        "files": files,
        **(extra_meta or {}),
    }
    with open(os.path.join(output_dir, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    return tok


# --------------------------------------------------------------------------------------------
# The interface


class EffMLMTokenizer:
    """A trained tokenizer directory, with the attributes megatron-core's datasets read
    (``inv_vocab``, ``cls``, ``sep``, ``mask``, ``pad``, ``eod``, ``unique_identifiers``)."""

    def __init__(self, path: str, meta: dict, hf_tok) -> None:
        self.path = os.path.abspath(path)
        self.meta = meta
        self.kind: str = meta["kind"]
        self.style: str = meta["style"]
        self._tok = hf_tok
        self.vocab: Dict[str, int] = hf_tok.get_vocab(with_added_tokens=True)
        self.inv_vocab: Dict[int, str] = {i: t for t, i in self.vocab.items()}
        self.vocab_size: int = hf_tok.get_vocab_size(with_added_tokens=True)
        specials = meta["special_tokens"]
        self.special_tokens: Dict[str, str] = {role: specials[role]["token"] for role in specials}
        self.cls: int = specials["cls"]["id"]
        self.sep: int = specials["sep"]["id"]
        self.pad: int = specials["pad"]["id"]
        self.mask: int = specials["mask"]["id"]
        self.unk: int = specials["unk"]["id"]
        self.bos, self.eos, self.eod = self.cls, self.sep, self.sep
        self.special_ids: List[int] = [self.cls, self.sep, self.pad, self.mask, self.unk]
        with open(os.path.join(self.path, HF_FILE), "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()
        # Keys megatron-core hashes into its dataset cache names; the digest keeps a retrained
        # tokenizer in the same directory from reusing stale indices.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", self.path), ("kind", self.kind),
             ("tokenizer_sha1", digest)]
        )
        self._word_start: Optional[numpy.ndarray] = None

    @classmethod
    def from_dir(cls, path: str) -> "EffMLMTokenizer":
        from tokenizers import Tokenizer

        if not path or not os.path.isdir(path):
            raise DataError(
                f"tokenizer directory not found: {path} (write one with tools/train_tokenizer.py)"
            )
        meta_path = os.path.join(path, META_FILE)
        hf_path = os.path.join(path, HF_FILE)
        for needed in (meta_path, hf_path):
            if not os.path.isfile(needed):
                raise DataError(
                    f"tokenizer directory {path} has no {os.path.basename(needed)} "
                    f"(write one with tools/train_tokenizer.py)"
                )
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            kind, style, specials = meta["kind"], meta["style"], meta["special_tokens"]
            for role in ("cls", "sep", "pad", "mask", "unk"):
                specials[role]["token"], specials[role]["id"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{meta_path}: not a valid tokenizer description ({err!r})") from None
        if kind not in KINDS or style not in STYLES:
            raise DataError(f"{meta_path}: unknown kind {kind!r} or style {style!r}")
        try:
            hf_tok = Tokenizer.from_file(hf_path)
        except Exception as err:  # tokenizers raises plain Exception on a bad file
            raise DataError(f"{hf_path}: cannot load HF tokenizer: {err}") from None
        for role, spec in specials.items():
            if hf_tok.token_to_id(spec["token"]) != spec["id"]:
                raise DataError(
                    f"{path}: special token {spec['token']} has id {hf_tok.token_to_id(spec['token'])} "
                    f"in {HF_FILE} but {spec['id']} in {META_FILE}"
                )
        return cls(path, meta, hf_tok)

    # -- encoding --------------------------------------------------------------------------

    def tokenize(self, text: str) -> List[int]:
        """Token ids of ``text``, no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def tokens(self, text: str) -> List[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def word_start_mask(self) -> numpy.ndarray:
        """[vocab_size] bool: True where a token begins a word (specials too)."""
        if self._word_start is None:
            mask = numpy.ones(self.vocab_size, dtype=bool)
            prefix = _WORD_START_PREFIX.get(self.kind)
            for i, token in self.inv_vocab.items():
                if self.kind == "wordpiece":
                    mask[i] = not token.startswith(_CONTINUATION_PREFIX)
                else:
                    mask[i] = token.startswith(prefix)
            mask[self.special_ids] = True
            self._word_start = mask
        return self._word_start

    def hf_tokenizer(self, **kwargs):
        """A ``transformers.PreTrainedTokenizerFast`` giving the same ids as ``tokenize()``
        (``kwargs``: more of its settings, e.g. ``model_max_length``)."""
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        s = self.special_tokens
        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_file(os.path.join(self.path, HF_FILE)),
            cls_token=s["cls"], sep_token=s["sep"], pad_token=s["pad"], mask_token=s["mask"],
            unk_token=s["unk"], bos_token=s["cls"], eos_token=s["sep"],
            clean_up_tokenization_spaces=False, **kwargs,
        )

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"EffMLMTokenizer(kind={self.kind!r}, style={self.style!r}, "
                f"vocab_size={self.vocab_size}, path={self.path!r})")
