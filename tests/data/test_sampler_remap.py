"""The global-batch sampler's ``skip`` (a resume in another layout): an epoch split between two
layouts trains every sample at most once, and all of them but the leftovers of a partial batch."""

from __future__ import annotations

import random

import pytest

from shardtune.data.sampler import GlobalBatchSampler


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("new_batch,new_seed,ranks", [(4, 3, 1), (3, 3, 2), (2, 9, 1), (8, 5, 2)])
def test_an_epoch_split_between_two_layouts_trains_each_sample_once(group_by_length, new_batch, new_seed, ranks):
    lengths = [random.Random(i).randint(3, 40) for i in range(47)]
    old = GlobalBatchSampler(lengths, batch_size=2, shuffle=True, seed=3, drop_last=True,
                             group_by_length=group_by_length)
    trained = old.trained_samples(epoch=1, batches=5)
    old.set_epoch(1)
    assert trained == {i for b in old.global_batches()[:5] for i in b} and len(trained) == 10
    seen = []
    for rank in range(ranks):  # each rank's slices of the new layout's batches, trained samples skipped
        new = GlobalBatchSampler(lengths, batch_size=new_batch, shuffle=True, seed=new_seed, drop_last=True,
                                 group_by_length=group_by_length, rank=rank, world_size=ranks)
        new.set_epoch(1, 0, trained)
        assert len(new) == new.epoch_batches == (47 - 10) // (new_batch * ranks)
        seen += [i for batch in new for i in batch]
    assert not set(seen) & trained and len(seen) == len(set(seen))  # never twice
    assert len(seen) == (47 - 10) // (new_batch * ranks) * new_batch * ranks  # all but a partial batch
    # a resume later in the same layout skips the same samples and the batches already done
    new = GlobalBatchSampler(lengths, batch_size=new_batch * ranks, shuffle=True, seed=new_seed, drop_last=True,
                             group_by_length=group_by_length)
    new.set_epoch(1, 2, trained)
    assert list(new) == new.global_batches()[2:] and len(new) == new.epoch_batches - 2


def test_without_skip_the_batches_are_unchanged():
    lengths = list(range(5, 30))
    a = GlobalBatchSampler(lengths, batch_size=4, shuffle=True, seed=1, drop_last=True, group_by_length=True)
    b = GlobalBatchSampler(lengths, batch_size=4, shuffle=True, seed=1, drop_last=True, group_by_length=True)
    a.set_epoch(2)
    b.set_epoch(2, 0, ())
    assert list(a) == list(b) and a.epoch_batches == len(a) == 6
