"""Hugging Face round trip: checkpoints saved on TP=2 / PP=2 by every target architecture export
to transformers classes that compute the same MLM logits (or 3ML encoder states) on real demo
text (fp32, 1e-4), with a tokenizer giving the trainer's ids; HF models import back exactly and
continue training on another layout; fine-tuning an exported demo-pre-trained model beats the
majority class; bad input gets one clear error."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import PYTHON, REPO_ROOT, run_scenarios, run_torchrun, tiny_model_args

# name -> (flags, nproc-layout flags, export target, encoder only)
SAVED = {
    "megatron-bert_tp2": ([], ["--tensor-model-parallel-size", "2"], "megatron-bert", False),
    "megatron-bert_pp2": ([], ["--pipeline-model-parallel-size", "2"], "megatron-bert", False),
    "bert_tp2": (["--model-arch", "bert"], ["--tensor-model-parallel-size", "2"], "bert", False),
    "bert_pp2": (["--model-arch", "bert"], ["--pipeline-model-parallel-size", "2"], "bert", False),
    "roberta_tp2": (["--model-arch", "roberta"], ["--tensor-model-parallel-size", "2"], "roberta", False),
    "roberta_pp2": (["--model-arch", "roberta"], ["--pipeline-model-parallel-size", "2"], "roberta", False),
    # token dropping (4 layers) is a plain BERT once trained; 3ML exports its encoder only
    "token-drop-bert_pp2": (["--model-arch", "bert", "--method", "token-drop", "--num-layers", "4"],
                            ["--pipeline-model-parallel-size", "2"], "bert", False),
    "3ml_tp2": (["--method", "3ml"], ["--tensor-model-parallel-size", "2"], "megatron-bert", True),
    "3ml-bert_pp2": (["--model-arch", "bert", "--method", "3ml"], ["--pipeline-model-parallel-size", "2"], "bert", True),
}
RESULTS = {}  # measured max abs differences, printed at the end of the module


@pytest.fixture(scope="module")
def saved(tmp_path_factory, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    """Every SAVED model trained 2 steps on its layout and saved there; plus one process
    against PP=2 and TP=2+SP for the post-LN token-dropping model."""
    tmp = tmp_path_factory.mktemp("hf_saved")
    base = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"))
    td = SAVED["token-drop-bert_pp2"][0]
    init = str(tmp / "td_init")
    ref = run_scenarios(tmp, 1, {"td_ref": {"args": base + td, "steps": 2, "save_init": init}}, "ref")
    scen = {n: {"args": base + a + lay, "steps": 2, "save_final": str(tmp / n)} for n, (a, lay, _, _) in SAVED.items()}
    for lay, flags in (("pp2", ["--pipeline-model-parallel-size", "2"]),
                       ("tp2sp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"])):
        scen[f"td_from_init_{lay}"] = {"args": base + td + flags + ["--load", init], "steps": 2}
    got = run_scenarios(tmp, 2, scen, "saved")
    return tmp, ref["td_ref"], got


@pytest.mark.parametrize("layout", ["pp2", "tp2sp"])
def test_post_ln_token_dropping_equals_one_process(saved, layout):
    """The post-LN layers under the token-dropping plan: PP=2 and TP=2 + sequence parallel."""
    _, ref, got = saved
    assert len(got[f"td_from_init_{layout}"]["steps"]) == len(ref["steps"]) == 2
    for a, b in zip(got[f"td_from_init_{layout}"]["steps"], ref["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-5)


def _demo_rows(demo_jsonl, tokenizer, T=64):
    """Three real demo paragraphs as [CLS] ids [SEP] rows; the last one padded (shorter)."""
    from megatron_effmlm.data.jsonl import iter_jsonl

    texts = []
    for _, _, (text,) in iter_jsonl([demo_jsonl], ["text"]):
        texts.append(" ".join(text.split()[:80]))
        if len(texts) == 3:
            break
    texts[2] = " ".join(texts[2].split()[:12])
    return texts, [[tokenizer.cls] + tokenizer.tokenize(t)[: T - 2] + [tokenizer.sep] for t in texts]


@pytest.mark.parametrize("name", list(SAVED))
def test_export_equals_our_model(saved, name, tmp_path, mcore_single, demo_jsonl, demo_tokenizer):
    import transformers

    from megatron_effmlm.hf.export import export, find_checkpoint, load_model, our_outputs

    tmp, _, _ = saved
    _, _, target, encoder_only = SAVED[name]
    out = str(tmp_path / "hf")
    r = export(str(tmp / name), out, target=target)
    expected_cls = {"megatron-bert": "MegatronBert", "bert": "Bert", "roberta": "Roberta"}[target] + \
        ("Model" if encoder_only else "ForMaskedLM")
    assert r["class"] == expected_cls
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "effmlm_export.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    # The exported tokenizer, through AutoTokenizer, gives the trainer's ids.
    texts, rows = _demo_rows(demo_jsonl, demo_tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = hf_tok(texts, truncation=True, max_length=64)
    assert enc["input_ids"] == rows

    T = max(map(len, rows))
    ids = torch.tensor([r + [demo_tokenizer.pad] * (T - len(r)) for r in rows])
    mask = (torch.arange(T)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    path, common = find_checkpoint(str(tmp / name))
    ours = load_model(path, common)
    logits, hidden = our_outputs(ours, ids, mask)
    sel = mask.bool()
    with torch.no_grad():
        if encoder_only:
            hf = transformers.AutoModel.from_pretrained(out).eval()
            assert type(hf).__name__ == expected_cls
            theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state[sel]
            diff = (theirs - hidden).abs().max().item()
            card = open(os.path.join(out, "README.md")).read()
            assert "no usable MLM head" in card and "`3ml`" in card
        else:
            hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
            assert type(hf).__name__ == expected_cls
            theirs = hf(input_ids=ids, attention_mask=mask).logits[sel]
            assert theirs.shape[1] == demo_tokenizer.vocab_size
            diff = (theirs - logits[:, : demo_tokenizer.vocab_size]).abs().max().item()
            assert logits.abs().max() > 0.1  # 1000x the tolerance: a real comparison
    RESULTS[name] = diff
    print(f"{name}: {expected_cls} max abs diff {diff:.2e} over {int(sel.sum())} tokens")
    assert diff < 1e-4, (name, diff)
    card = open(os.path.join(out, "README.md")).read()
    for word in ("method", "data", "steps", "tokens", "FLOPs"):
        assert word in card


# ----- import -----

def _random_hf(kind, folder, tokenizer_dir):
    """A tiny HF model of `kind` with every weight random (LayerNorms too), saved with a tokenizer."""
    import transformers

    from megatron_effmlm.data.tokenizer import EffMLMTokenizer

    tok = EffMLMTokenizer.from_dir(tokenizer_dir)
    cls = {"bert": (transformers.BertConfig, transformers.BertForMaskedLM),
           "roberta": (transformers.RobertaConfig, transformers.RobertaForMaskedLM),
           "megatron-bert": (transformers.MegatronBertConfig, transformers.MegatronBertForMaskedLM)}[kind]
    off = tok.pad + 1 if kind == "roberta" else 0
    cfg = cls[0](vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=64 + off, type_vocab_size=1 if kind == "roberta" else 2,
                 pad_token_id=tok.pad, layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = cls[1](cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(1.0 if ("LayerNorm.weight" in n or "ln.weight" in n or "layer_norm.weight" in n) else 0.0, 0.05)
    model.save_pretrained(folder)
    tok.hf_tokenizer(model_max_length=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported(tmp_path_factory, demo_tokenizer_dir, test_cache_dir, demo_jsonl):
    """Random HF models of the three classes (RoBERTa with a byte-level BPE tokenizer, pad id 1),
    each imported by tools/import_hf.py in one driver process."""
    from megatron_effmlm.data.jsonl import iter_jsonl
    from megatron_effmlm.data.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("hf_import")
    bpe = str(tmp / "bpe_tok")
    texts = [v[0] for _, _, v in iter_jsonl([demo_jsonl], ["text"])][:20]
    train_tokenizer(texts, "bpe", 400, bpe)
    folders = {k: _random_hf(k, str(tmp / f"hf_{k}"), bpe if k == "roberta" else demo_tokenizer_dir)
               for k in ("bert", "roberta", "megatron-bert")}
    driver = tmp / "driver.py"
    driver.write_text(
        "import sys\nsys.path.insert(0, 'tools')\nfrom import_hf import main\n"
        "if __name__ == '__main__':\n"
        + "".join(f"    assert main(['--hf-dir', {f!r}, '--output', {str(tmp / ('ck_' + k))!r}]) == 0\n"
                  for k, f in folders.items()))
    r = subprocess.run([PYTHON, str(driver)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, folders


@pytest.mark.parametrize("kind", ["bert", "roberta", "megatron-bert"])
def test_import_then_export_is_exact(imported, kind, tmp_path, mcore_single):
    from safetensors.torch import load_file

    from megatron_effmlm.hf.export import export

    tmp, folders = imported
    out = str(tmp_path / "again")
    export(str(tmp / f"ck_{kind}"), out)
    a = load_file(os.path.join(folders[kind], "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The imported tokenizer (this project's format) and the re-exported one agree with the original.
    import transformers

    from megatron_effmlm.data.tokenizer import EffMLMTokenizer

    ours = EffMLMTokenizer.from_dir(str(tmp / f"ck_{kind}" / "tokenizer"))
    text = "Anarchism is a political philosophy and movement, sceptical of authority."
    want = transformers.AutoTokenizer.from_pretrained(folders[kind])(text)["input_ids"]
    assert [ours.cls] + ours.tokenize(text) + [ours.sep] == want
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == want
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (folders[kind], out))
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size", "pad_token_id", "layer_norm_eps"):
        assert ca[key] == cb[key], key


def test_import_then_train(imported, demo_data_prefix, test_cache_dir, tmp_path):
    """The imported BERT (post-LN, with token types) continues on TP=2, and with 3ML on PP=2
    (the decoder and e_mask the HF model never had start fresh)."""
    tmp, _ = imported
    flags = open(tmp / "ck_bert" / "model_args.txt").read().split()
    common = flags + ["--data-path", demo_data_prefix, "--micro-batch-size", "4", "--global-batch-size", "8",
                      "--lr", "1e-3", "--data-cache-path", os.path.join(test_cache_dir, "dc")]
    got = run_scenarios(tmp_path, 2, {
        "vanilla_tp2": {"args": common + ["--tensor-model-parallel-size", "2"], "steps": 2},
        "3ml_pp2": {"args": common + ["--method", "3ml", "--pipeline-model-parallel-size", "2"], "steps": 2},
    }, "continue")
    for name, r in got.items():
        losses = [s["loss"] for s in r["steps"]]
        assert [s["iteration"] for s in r["steps"]] == [1, 2], name
        assert all(0 < x < 20 for x in losses) and losses[0] != losses[1], (name, losses)


# ----- fine-tuning -----

@pytest.fixture(scope="module")
def demo_pretrained(demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    """A tiny model pre-trained for 600 steps, cached in the test cache. After 150 steps it still
    sits at the unigram plateau, where fine-tuning from it stayed at the majority class for 2
    of 3 seeds (and on CI); after 600, 12 of 12 pre-training x fine-tuning seeds reached 0.65-0.70."""
    path = os.path.join(test_cache_dir, "hf_demo_pretrained_v2")
    if not os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")):
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"), **{
            "--hidden-size": 128, "--micro-batch-size": 32, "--global-batch-size": 32, "--train-iters": 600,
            "--min-lr": 1e-4, "--lr-warmup-iters": 20, "--split": "98,2,0", "--log-interval": 50,
            "--hidden-dropout": 0.1, "--attention-dropout": 0.1})
        r = run_torchrun(1, ["pretrain_effmlm.py", *args, "--save", tmp])
        assert r.returncode == 0, r.stderr[-4000:]
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


@pytest.fixture(scope="module")
def rotten_tomatoes(test_cache_dir):
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    from rotten_tomatoes_to_glue import fetch_csv, read_reviews, write_glue

    out = os.path.join(test_cache_dir, "rotten_tomatoes_small")
    if not os.path.isfile(os.path.join(out, "dev.tsv")):
        write_glue(read_reviews(fetch_csv(os.path.join(test_cache_dir, "cache"))), out, 600, 1, max_train=2000)
    return out


def test_rotten_tomatoes_split(rotten_tomatoes, test_cache_dir):
    from rotten_tomatoes_to_glue import fetch_csv, read_reviews

    reviews = read_reviews(fetch_csv(os.path.join(test_cache_dir, "cache")))
    assert len({t for t, _ in reviews}) == len(reviews) > 12000
    train = open(os.path.join(rotten_tomatoes, "train.tsv")).read().splitlines()
    dev = open(os.path.join(rotten_tomatoes, "dev.tsv")).read().splitlines()
    assert train[0] == dev[0] == "sentence\tlabel" and len(train) == 2001 and len(dev) == 601
    assert not {line.split("\t")[0] for line in train[1:]} & {line.split("\t")[0] for line in dev[1:]}


def test_finetune_beats_majority(demo_pretrained, rotten_tomatoes, tmp_path, mcore_single):
    from megatron_effmlm.hf.export import export
    from megatron_effmlm.hf.finetune import finetune

    out = str(tmp_path / "hf")
    export(demo_pretrained, out)
    r = finetune(out, rotten_tomatoes, task="sst2", seeds=(1,), epochs=3, lr=5e-4, max_length=64)
    acc, base = r["summary"]["accuracy"]["mean"], r["majority_baseline"]["accuracy"]
    print(f"rotten tomatoes dev accuracy {acc:.4f} vs majority class {base:.4f}")
    RESULTS["finetune"] = (acc, base)
    assert acc > base + 0.03


def test_glue_formats_and_metrics(tmp_path):
    """CoLA (no header, MCC) and MRPC (its header, F1) as GLUE ships them."""
    from megatron_effmlm.hf.finetune import TASKS, metrics, read_tsv, resolve_task

    cola = tmp_path / "CoLA"
    cola.mkdir()
    (cola / "train.tsv").write_text("gj04\t1\t\tOur friends won't buy this analysis.\n"
                                    "gj04\t0\t*\tThey drank the pub.\n")
    assert resolve_task("auto", str(cola)) == "cola"
    x, y, skipped = read_tsv(str(cola / "train.tsv"), TASKS["cola"])
    assert x == [("Our friends won't buy this analysis.", None), ("They drank the pub.", None)] and y == ["1", "0"]
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    (mrpc / "train.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                    "1\t702876\t702977\tAmrozi accused his brother.\tReferring to him.\nbroken\n")
    x, y, skipped = read_tsv(str(mrpc / "train.tsv"), TASKS[resolve_task("auto", str(mrpc))])
    assert x == [("Amrozi accused his brother.", "Referring to him.")] and y == ["1"] and skipped == 1
    m = metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], ("mcc", "accuracy", "f1"), positive=1)
    assert m["accuracy"] == pytest.approx(0.6) and m["f1"] == pytest.approx(2 / 3)
    assert m["mcc"] == pytest.approx((2 * 1 - 1 * 1) / (3 * 2 * 2 * 3) ** 0.5)


# ----- bad input -----

def test_export_bad_input(saved, tmp_path, mcore_single, demo_data_prefix):
    from megatron_effmlm.hf.convert import ConversionError, check_exportable
    from megatron_effmlm.hf.export import export

    tmp, _, _ = saved
    with pytest.raises(ConversionError) as e:
        export(os.path.dirname(demo_data_prefix), str(tmp_path / "x"))
    assert str(e.value) == (f"--checkpoint {os.path.dirname(demo_data_prefix)} is not a checkpoint: no "
                            "latest_checkpointed_iteration.txt and no dist_checkpointing metadata (point it at a "
                            "--save folder or one iter_* folder)")
    with pytest.raises(ConversionError) as e:
        export(str(tmp / "megatron-bert_tp2"), str(tmp_path / "x"), tokenizer_dir=str(tmp_path / "no_tok"))
    assert str(e.value) == (f"tokenizer directory not found: {tmp_path / 'no_tok'} (write one with "
                            "tools/train_tokenizer.py) (the checkpoint's tokenizer; pass --tokenizer-dir)")
    with pytest.raises(ConversionError) as e:
        export(str(tmp / "megatron-bert_tp2"), str(tmp_path / "x"), target="bert")
    assert str(e.value) == ("the checkpoint's model is pre-LayerNorm (--model-arch megatron-bert) but BertForMaskedLM "
                            "is post-LayerNorm: it cannot be exported exactly; use --target megatron-bert")
    with pytest.raises(ConversionError) as e:
        export(str(tmp / "roberta_tp2"), str(tmp_path / "x"), target="megatron-bert")
    assert "is post-LayerNorm (--model-arch roberta) but MegatronBertForMaskedLM is pre-LayerNorm" in str(e.value)
    with pytest.raises(ConversionError) as e:
        check_exportable({"position_embedding_type": "rope"}, "megatron-bert")
    assert str(e.value) == ("--position-embedding-type rope: MegatronBertForMaskedLM has learned absolute positions "
                            "only; a RoPE model cannot be exported exactly")
    assert not os.path.exists(tmp_path / "x")


def test_import_bad_input(imported, tmp_path):
    from megatron_effmlm.hf.convert import ConversionError
    from megatron_effmlm.hf.import_hf import import_hf

    tmp, folders = imported
    with pytest.raises(ConversionError) as e:
        import_hf(str(tmp), str(tmp_path / "o"))
    assert str(e.value) == f"--hf-dir {tmp} is not a Hugging Face model folder: no config.json"
    no_tok = tmp_path / "no_tok"
    shutil.copytree(folders["bert"], no_tok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(no_tok / f)
    with pytest.raises(ConversionError) as e:
        import_hf(str(no_tok), str(tmp_path / "o2"))
    assert str(e.value) == (f"--hf-dir {no_tok} has no tokenizer: none of tokenizer.json, vocab.txt, "
                            "vocab.json + merges.txt")
    assert not os.path.exists(tmp_path / "o2")
    gelu_new = tmp_path / "gelu_new"
    shutil.copytree(folders["bert"], gelu_new)
    cfg = json.load(open(gelu_new / "config.json"))
    cfg["hidden_act"] = "gelu_new"
    json.dump(cfg, open(gelu_new / "config.json", "w"))
    with pytest.raises(ConversionError) as e:
        import_hf(str(gelu_new), str(tmp_path / "o3"))
    assert str(e.value) == f"{gelu_new}/config.json cannot be imported exactly: hidden_act 'gelu_new' (ours: exact GELU, 'gelu')"


def test_export_cli_error_exit_code(tmp_path):
    r = subprocess.run([PYTHON, "tools/export_hf.py", "--checkpoint", str(tmp_path / "nope"), "--output-dir",
                        str(tmp_path / "o")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: --checkpoint {tmp_path / 'nope'}: no such directory"


def test_post_ln_arch_flags():
    from megatron_effmlm.arguments import parse_args
    from megatron_effmlm.config import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_args(["--data-path", "x", "--tokenizer-dir", "y", "--model-arch", "roberta",
                    "--transformer-impl", "transformer_engine"])
    assert str(e.value) == "--model-arch roberta (post-LayerNorm) exists for --transformer-impl local only"
    cfg = parse_args(["--data-path", "x", "--tokenizer-dir", "y", "--model-arch", "bert"])
    assert cfg.model.post_layernorm and cfg.model.num_tokentypes == 0


def test_report(request):
    """Prints the measured differences (pytest -s shows them)."""
    print(json.dumps(RESULTS, indent=1))
