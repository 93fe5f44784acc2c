"""Global-batch sampler: every rank derives the same global batches, then takes its own slice.

Global batches hold ``batch_size * world_size`` sample indices in an order fixed by (seed, epoch);
rank r takes ``[r*batch_size:(r+1)*batch_size]`` of each. One process with batch size B*W therefore
sees exactly the global batches that W ranks with batch size B see together.
"""

from __future__ import annotations

import math
import random
from typing import Iterable, Iterator, Sequence

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
    * ``set_epoch(epoch, start_batch, skip)``: ``skip`` holds samples of the epoch already trained
      under another layout (a resume with another global batch size or seed); the epoch's batches
      are formed from the other samples only, so each sample is still trained once per epoch.
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
        self.skip: frozenset[int] = frozenset()

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0, skip: Iterable[int] = ()) -> None:
        """Select the epoch's order; ``start_batch`` skips batches already trained (resume), and
        ``skip`` samples already trained in this epoch under an earlier layout."""
        self.epoch, self.start_batch, self.skip = epoch, start_batch, frozenset(skip)

    def with_layout(self, *, global_batch_size: int, seed: int) -> "GlobalBatchSampler":
        """The same rows batched another way (one process holding whole global batches): what an
        earlier run with that global batch size and seed trained."""
        return GlobalBatchSampler(self.lengths, batch_size=global_batch_size, shuffle=self.shuffle, seed=seed,
                                  drop_last=self.drop_last, group_by_length=self.group_by_length)

    def trained_samples(self, epoch: int, batches: int, skip: Iterable[int] = ()) -> set[int]:
        """The samples of ``epoch``'s first ``batches`` global batches (with ``skip`` formed as in
        ``set_epoch``), together with ``skip``: what a run that stopped there had trained."""
        self.set_epoch(epoch, 0, skip)
        done = set(self.skip)
        for batch in self.global_batches()[:batches]:
            done.update(batch)
        return done

    @property
    def epoch_batches(self) -> int:
        """Global batches of the current epoch, counting those ``start_batch`` skips."""
        return self._total()

    def _total(self) -> int:
        n, size = len(self.lengths) - len(self.skip), self.global_batch_size
        return n // size if self.drop_last else math.ceil(n / size)

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        epoch = self.epoch if epoch is None else epoch
        rng = random.Random(f"shardtune:{self.seed}:{epoch}")  # str seeds are stable across runs
        size = self.global_batch_size
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.skip:  # trained earlier in this epoch under another layout
            order = [i for i in order if i not in self.skip]
        n = len(order)
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
        return max(0, self._total() - self.start_batch)
