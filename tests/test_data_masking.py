"""mask_tokens: exact budget, specials untouched, 80/10/10 statistics, whole words."""

import json

import numpy
import pytest

from megatron_effmlm.data.masking import MaskingSpec, mask_tokens, masking_budget


@pytest.fixture(scope="module")
def spec(demo_tokenizer):
    return MaskingSpec.from_tokenizer(demo_tokenizer)


def _random_sample(rng, tok, length):
    """[CLS] random non-special ids with a [SEP] or two inside, [SEP], then padding."""
    n_real = rng.randint(1, length - 1)
    body = rng.randint(5, tok.vocab_size, size=n_real)
    body[rng.rand(n_real) < 0.05] = tok.sep
    tokens = numpy.full(length, tok.pad)
    tokens[: n_real + 2] = numpy.concatenate([[tok.cls], body, [tok.sep]])
    return tokens


def test_budget_rounding():
    assert [masking_budget(n, 0.15) for n in (0, 1, 3, 6, 10, 100, 510)] == [0, 1, 1, 1, 2, 15, 77]
    assert masking_budget(5, 0.5) == 3  # half rounds up
    assert masking_budget(2, 0.9) == 2  # never more than the candidates


@pytest.mark.parametrize("rate", [0.15, 0.4])
def test_exact_count_specials_never_masked(demo_tokenizer, rate):
    tok = demo_tokenizer
    spec = MaskingSpec.from_tokenizer(tok, masking_probability=rate)
    rng = numpy.random.RandomState(0)
    for trial in range(300):
        tokens = _random_sample(rng, tok, 128)
        out = mask_tokens(tokens, numpy.random.RandomState(trial), spec)
        real = ~numpy.isin(tokens, tok.special_ids)
        assert out.loss_mask.sum() == max(1, int(numpy.floor(rate * real.sum() + 0.5)))
        assert real[out.positions].all()  # only non-special tokens are predicted
        assert (out.input_ids[~real] == tokens[~real]).all()
        assert (out.labels[out.positions] == tokens[out.positions]).all()
        assert (out.labels[out.loss_mask == 0] == -1).all()
        unpredicted = out.loss_mask == 0
        assert (out.input_ids[unpredicted] == tokens[unpredicted]).all()


def test_80_10_10_proportions(demo_tokenizer, spec):
    tok = demo_tokenizer
    rng = numpy.random.RandomState(1)
    n_mask = n_random = n_same = 0
    random_ids = []
    for trial in range(400):
        tokens = numpy.concatenate([[tok.cls], rng.randint(5, tok.vocab_size, size=510), [tok.sep]])
        out = mask_tokens(tokens, numpy.random.RandomState(10_000 + trial), spec)
        assert out.positions.size == 77
        new, old = out.input_ids[out.positions], tokens[out.positions]
        n_mask += (new == tok.mask).sum()
        changed = (new != tok.mask) & (new != old)
        n_random += changed.sum()
        n_same += (new == old).sum()
        random_ids.append(new[changed])
    total = 400 * 77
    random_ids = numpy.concatenate(random_ids)
    assert abs(n_mask / total - 0.8) < 0.015
    assert abs(n_random / total - 0.1) < 0.01
    assert abs(n_same / total - 0.1) < 0.01
    assert not numpy.isin(random_ids, tok.special_ids).any()  # random tokens are never special
    assert numpy.unique(random_ids).size > 0.4 * random_ids.size  # spread over the vocabulary


def test_all_mask_mode(demo_tokenizer):
    tok = demo_tokenizer
    spec = MaskingSpec.from_tokenizer(tok, masking_probability=0.5, mask_80_10_10=False)
    tokens = numpy.concatenate([[tok.cls], numpy.arange(10, 110), [tok.sep]])
    out = mask_tokens(tokens, numpy.random.RandomState(3), spec)
    assert out.positions.size == 50
    assert (out.input_ids[out.positions] == tok.mask).all()


def test_whole_word_masking_masks_whole_words(demo_tokenizer, demo_jsonl):
    tok = demo_tokenizer
    spec = MaskingSpec.from_tokenizer(tok, masking_probability=0.15, whole_word_masking=True)
    starts = tok.word_start_mask()
    with open(demo_jsonl) as f:
        texts = [json.loads(line)["text"] for line in f][:20]
    counts, budgets = 0, 0
    for trial, text in enumerate(texts):
        ids = tok.tokenize(text)[:200]
        tokens = numpy.array([tok.cls] + ids + [tok.sep])
        assert not starts[tokens[1:-1]].all()  # the text has multi-piece words
        out = mask_tokens(tokens, numpy.random.RandomState(trial), spec)
        budget = masking_budget(len(ids), 0.15)
        assert 0 < out.positions.size <= budget
        counts, budgets = counts + out.positions.size, budgets + budget
        masked = out.loss_mask.astype(bool)
        # A word: a word-start token and the continuation pieces after it.
        word = numpy.cumsum(starts[tokens])
        for w in numpy.unique(word[masked]):
            assert masked[word == w].all(), tok.tokens(tok.detokenize(tokens[word == w]))
    assert counts >= 0.97 * budgets  # the budget is filled with words that fit
