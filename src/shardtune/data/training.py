"""The training and eval loaders as the recipe builds them from the config.

One function per loader, shared by the recipe (``finetuning.setup_data``) and ``shardtune data``,
so that what ``shardtune data`` shows and refuses is what training would load and refuse.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch.utils.data import DataLoader

from ..config.configs import BatchingStrategy
from ..config.errors import ShardtuneError
from ..config.parse import Config
from .loader import build_dataloader
from .split import TokenizedSplit


def build_train_loader(cfg: Config, split: TokenizedSplit, tokenizer, *, rank: int = 0, world_size: int = 1,
                       packed_varlen: bool = False, required_keys: Sequence[str] = (),
                       num_workers: Optional[int] = None) -> DataLoader:
    """This rank's training loader (shuffled by ``--seed``, incomplete last batch dropped); an error
    when the split gives no full batch. ``num_workers``: None means ``--num_workers_dataloader``
    (worker processes change no sample; ``shardtune data`` starts none)."""
    t = cfg.train
    loader = build_dataloader(
        split.samples, tokenizer=tokenizer, strategy=t.batching_strategy,
        batch_size=t.batch_size_training, context_length=t.context_length, shuffle=True,
        seed=t.seed, rank=rank, world_size=world_size, drop_last=True,
        num_workers=t.num_workers_dataloader if num_workers is None else num_workers,
        collate_fn=split.collate_fn, packed_varlen=packed_varlen, required_keys=required_keys)
    if len(loader) == 0:
        needed = t.batch_size_training * world_size
        if t.batching_strategy is BatchingStrategy.packing:  # the batches are the packed sequences
            packed = len(loader.dataset)
            have = (f"{len(split.samples)} samples packed into {packed} sequence{'' if packed == 1 else 's'} "
                    f"of --context_length {t.context_length} tokens")
            fix = "Lower --batch_size_training or --context_length, use --batching_strategy padding, or add data."
        else:
            have = f"{len(split.samples)} samples"
            fix = "Lower --batch_size_training or add data."
        raise ShardtuneError(
            f"The training set gives no full batch: {have}, and a global batch of "
            f"{t.batch_size_training} x {world_size} ranks needs {needed}. {fix}")
    return loader


def build_eval_loader(cfg: Config, split: TokenizedSplit, tokenizer, *, rank: int = 0, world_size: int = 1,
                      packed_varlen: bool = False, required_keys: Sequence[str] = (),
                      num_workers: Optional[int] = None) -> DataLoader:
    """This rank's eval loader (in order, the last batch kept and filled up); ``num_workers`` as for
    :func:`build_train_loader`."""
    t = cfg.train
    return build_dataloader(
        split.samples, tokenizer=tokenizer, strategy=t.batching_strategy,
        batch_size=t.val_batch_size, context_length=t.context_length, shuffle=False,
        seed=t.seed, rank=rank, world_size=world_size, drop_last=False,
        num_workers=t.num_workers_dataloader if num_workers is None else num_workers,
        collate_fn=split.collate_fn, packed_varlen=packed_varlen,
        required_keys=required_keys)
