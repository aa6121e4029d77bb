"""Micro-batches: resume at consumed_samples, data-parallel sharding, collate."""

import numpy
import pytest
import torch

from megatron_effmlm.data.batches import MegatronPretrainingSampler, collate, make_data_iterator
from megatron_effmlm.data.dataset import build_train_valid_test_datasets
from megatron_effmlm.data.errors import DataError

T = 64


@pytest.fixture(scope="module")
def train(demo_data_prefix, demo_tokenizer, tmp_path_factory):
    ds, _, _ = build_train_valid_test_datasets(
        [demo_data_prefix], tokenizer=demo_tokenizer, seq_length=T, split="98,2,0", train_samples=96, valid_samples=8,
        test_samples=0, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return ds


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_collate(train):
    batch = collate([train[0], train[1], train[2]])
    for key in ("text", "labels", "loss_mask", "padding_mask", "types"):
        assert batch[key].shape == (3, T) and batch[key].dtype == torch.int64
        assert numpy.array_equal(batch[key][1].numpy(), train[1][key])
    assert batch["is_random"].tolist() == [0, 0, 0] and batch["is_random"].dtype == torch.int64


def test_resume_equals_tail_of_uninterrupted_run(train):
    full = list(make_data_iterator(train, consumed_samples=0, micro_batch_size=4))
    assert len(full) == 24
    assert _same(full[0], collate([train[i] for i in range(4)]))
    resumed = list(make_data_iterator(train, consumed_samples=40, micro_batch_size=4))
    assert len(resumed) == 14 and all(_same(a, b) for a, b in zip(resumed, full[10:]))


def test_data_parallel_ranks_share_each_global_batch(train):
    mbs, dp = 3, 2
    ranks = [list(make_data_iterator(train, 0, mbs, r, dp)) for r in range(dp)]
    assert [len(r) for r in ranks] == [16, 16]
    single = list(make_data_iterator(train, 0, mbs * dp))  # one rank taking whole slots
    for step, whole in enumerate(single):
        joined = {k: torch.cat([ranks[0][step][k], ranks[1][step][k]]) for k in whole}
        assert _same(joined, whole)
    resumed = [list(make_data_iterator(train, 36, mbs, r, dp)) for r in range(dp)]
    assert all(_same(a, b) for r in range(dp) for a, b in zip(resumed[r], ranks[r][6:]))


def test_sampler_indices_and_errors():
    s = MegatronPretrainingSampler(10, 0, 2, 1, 2, drop_last=False)
    assert list(s) == [[2, 3], [6, 7]] and len(s) == 2
    assert list(MegatronPretrainingSampler(10, 0, 2, 0, 2, drop_last=False)) == [[0, 1], [4, 5], [8, 9]]
    assert list(MegatronPretrainingSampler(10, 4, 2, 0, 2)) == [[4, 5]]
    with pytest.raises(DataError, match=r"^consumed_samples=6 is not a multiple of micro_batch_size \* "
                                        r"data_parallel_size = 4"):
        MegatronPretrainingSampler(100, 6, 2, 0, 2)
    with pytest.raises(DataError, match=r"^consumed_samples=100 >= the 100 samples of the dataset"):
        MegatronPretrainingSampler(100, 100, 2, 0, 2)
    with pytest.raises(DataError, match=r"^data parallel rank 2 is not in \[0, 2\)"):
        MegatronPretrainingSampler(100, 0, 2, 2, 2)
