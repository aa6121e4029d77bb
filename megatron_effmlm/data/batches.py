"""Micro-batches for data-parallel training, resumable at any consumed-sample count.

Global order as Megatron-LM's MegatronPretrainingSampler: samples are taken in dataset order
in slots of ``micro_batch_size * data_parallel_size``; DP rank r gets the r-th micro-batch of
each slot. A run resumed with the consumed-sample count sees exactly the samples an
uninterrupted run would have seen next (the samples themselves are deterministic per index).
"""

from typing import Dict, Iterator, List, Sequence

import numpy
import torch

from megatron_effmlm.data.errors import DataError


def collate(samples: Sequence[Dict]) -> Dict[str, torch.Tensor]:
    """Stack a list of sample dicts (numpy arrays or ints) into a dict of tensors."""
    if not samples:
        raise DataError("collate: empty list of samples")
    keys = samples[0].keys()
    batch = {}
    for key in keys:
        values = [s[key] for s in samples]
        if isinstance(values[0], numpy.ndarray):
            batch[key] = torch.from_numpy(numpy.stack(values))
        else:
            batch[key] = torch.tensor(numpy.asarray(values))
    return batch


class MegatronPretrainingSampler:
    """Batch sampler yielding this DP rank's index lists from ``consumed_samples`` on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise DataError(f"no samples in the dataset (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise DataError(f"micro batch size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(
                f"data parallel rank {data_parallel_rank} is not in [0, {data_parallel_size})"
            )
        slot = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % slot != 0:
            raise DataError(
                f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size * "
                f"data_parallel_size = {slot}; a resume point must fall between global micro-batches"
            )
        if consumed_samples >= total_samples:
            raise DataError(
                f"consumed_samples={consumed_samples} >= the {total_samples} samples of the dataset; "
                f"build the dataset with more samples (train iterations x global batch size)"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.slot = slot
        self.drop_last = drop_last

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full = remaining // self.slot
        if self.drop_last or remaining % self.slot == 0:
            return full
        return full + int(remaining % self.slot > self.rank * self.micro_batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        mine = slice(self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size)
        for begin in range(self.consumed_samples, self.total_samples, self.slot):
            slot = list(range(begin, min(begin + self.slot, self.total_samples)))
            if len(slot) < self.slot and self.drop_last:
                return
            batch = slot[mine]
            if batch:
                yield batch


def make_data_loader(dataset, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int = 0,
                     data_parallel_size: int = 1, num_workers: int = 0, drop_last: bool = True):
    sampler = MegatronPretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size, drop_last
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        persistent_workers=num_workers > 0,
        # Its own generator: starting an iterator must not draw from torch's global RNG,
        # which drives dropout and is restored exactly on resume.
        generator=torch.Generator(),
    )


def make_data_iterator(dataset, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int = 0,
                       data_parallel_size: int = 1, num_workers: int = 0, drop_last: bool = True
                       ) -> Iterator[Dict[str, torch.Tensor]]:
    """Iterator over this DP rank's micro-batches (dicts of tensors), from ``consumed_samples``."""
    return iter(make_data_loader(dataset, consumed_samples, micro_batch_size, data_parallel_rank,
                                 data_parallel_size, num_workers, drop_last))
