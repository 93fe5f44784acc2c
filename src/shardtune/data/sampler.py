"""Global-batch sampler: every rank derives the same global batches, then takes its own slice.

Global batches hold ``batch_size * world_size`` sample indices in an order fixed by (seed, epoch);
rank r takes ``[r*batch_size:(r+1)*batch_size]`` of each. One process with batch size B*W therefore
sees exactly the global batches that W ranks with batch size B see together.
"""

from __future__ import annotations

import math
import random
from typing import Iterator, Sequence

from torch.utils.data import Sampler


def filler(index: int) -> int:
    """Marks "a copy of sample ``index`` that must not be trained on" (see ``collate.Rows``)."""
    return -1 - index


class GlobalBatchSampler(Sampler[list[int]]):
    """Batch sampler with ``set_epoch``; optionally length-grouped (llama-recipes' padding).

    * ``group_by_length``: indices sorted by length (ties broken by the shuffled order), chunked
      into global batches; with ``shuffle`` the batch order is shuffled. Without shuffle batches go
      from shortest to longest.
    * otherwise: dataset order, or a per-epoch permutation with ``shuffle``.
    * ``drop_last``: the incomplete global batch is dropped. For length grouping with shuffle the
      dropped samples are a random run of the length order (not always the longest ones).
      Without ``drop_last``, a rank whose slice of the last global batch is empty gets one
      filler sample (a copy of the batch's first sample, labels masked) so all ranks run the same
      number of steps, as FSDP requires.
    """

    def __init__(self, lengths: Sequence[int], *, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool, group_by_length: bool, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.lengths = list(lengths)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.group_by_length = group_by_length
        self.epoch, self.start_batch = 0, 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; ``start_batch`` skips batches already trained (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        epoch = self.epoch if epoch is None else epoch
        rng = random.Random(f"shardtune:{self.seed}:{epoch}")  # str seeds are stable across runs
        n, size = len(self.lengths), self.global_batch_size
        order = list(range(n))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            order.sort(key=self.lengths.__getitem__)  # stable: equal lengths keep shuffled order
        rest = n % size
        if self.drop_last and rest:
            start = rng.randrange(n - rest + 1) if self.shuffle and self.group_by_length else n - rest
            del order[start:start + rest]
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        return batches

    def _local(self, batch: list[int]) -> list[int]:
        part = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return part or [filler(batch[0])]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start_batch:]:
            yield self._local(batch)

    def __len__(self) -> int:
        n, size = len(self.lengths), self.global_batch_size
        total = n // size if self.drop_last else math.ceil(n / size)
        return max(0, total - self.start_batch)
