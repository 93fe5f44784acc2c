"""Dataset name -> loader, and ``load_split``: the one entry point the recipe calls for data."""

from __future__ import annotations

from typing import Callable, Optional

from ..config.errors import ShardtuneError
from ..config.parse import Config
from . import alpaca, chat_dataset, custom, grammar, preference, samsum, vision
from .image_checks import ONE_PROCESS, Share, check_shared
from .rows import RawSplit, finalize
from .split import TokenizedSplit

# loader(dataset_config, tokenizer, split, train_config) -> RawSplit
DATASETS: dict[str, Callable[..., RawSplit]] = {
    "alpaca_dataset": alpaca.load,
    "grammar_dataset": grammar.load,
    "samsum_dataset": samsum.load,
    "custom_dataset": custom.load,
    "ocrvqa_dataset": vision.load,  # Llama 3.2 Vision: pass the processor as the tokenizer
    "chat_dataset": chat_dataset.load,  # text or vision: the tokenizer or the processor
    "preference_dataset": preference.load,  # chosen / rejected pairs for --use_dpo
}
# Loaders that read and check embedded images as they read rows, only in this rank's share: they
# take ``share=`` (image_checks.py).
SHARE_AWARE = frozenset({"ocrvqa_dataset"})
SPLITS = ("train", "test")
# Datasets of text rows encoded with a tokenizer; a vision model is fed image + text batches by
# its processor (ocrvqa_dataset, or a custom_dataset whose file builds them).
TEXT_DATASETS = frozenset({"alpaca_dataset", "grammar_dataset", "samsum_dataset", "preference_dataset"})


def check_dataset_for_model(name: str, model_is_vision: bool, model_name: str) -> None:
    """Refuse a text-only dataset for a vision model before any work starts."""
    if model_is_vision and name in TEXT_DATASETS:
        raise ShardtuneError(
            f"--dataset {name} is a text dataset, but --model_name {model_name!r} is a Llama 3.2 Vision model, "
            "which is fed image + text batches by its processor. Use a vision dataset (--dataset "
            "ocrvqa_dataset, or --dataset custom_dataset with a file that builds image + text batches: "
            "docs/vision.md), or fine-tune a text Llama on this dataset.")


# Cheap checks of a dataset's source that can run before any rank starts (no data is read).
SOURCE_CHECKS: dict[str, Callable[..., None]] = {
    "alpaca_dataset": alpaca.check_source,
    "samsum_dataset": samsum.check_source,
    "ocrvqa_dataset": vision.check_source,
    "chat_dataset": chat_dataset.check_source,
}


def check_data_source(cfg: Config) -> None:
    """Refuse a dataset that cannot load (e.g. a hub dataset without ``datasets`` installed)
    before the model is loaded or ranks are launched."""
    name = cfg.train.dataset
    if name not in DATASETS:
        raise ShardtuneError(f"Unknown dataset {name!r}. Choose one of {sorted(DATASETS)}; for your "
                             f"own data use --dataset custom_dataset --custom_dataset.file file.py.")
    check = SOURCE_CHECKS.get(name)
    if check is not None:
        check(cfg.dataset_config)


def adopt_dataset_template(cfg: Config, tokenizer) -> Optional[str]:
    """Give the tokenizer (or processor) the chat template the dataset renders with, where the
    dataset names its own (``--chat_dataset.chat_template``), so the saved model carries the
    template it was trained on. Returns a line for the log, or None when nothing changed."""
    if cfg.train.dataset == "chat_dataset":
        return chat_dataset.adopt_template(cfg.dataset_config, tokenizer)
    return None


def load_split(cfg: Config, tokenizer, split: str, share: Share = ONE_PROCESS) -> TokenizedSplit:
    """Tokenised samples of ``cfg.train.dataset``'s ``split`` ("train" or "test"), with bad rows and
    overlong samples handled by ``skip_bad_rows`` / ``overlong`` and counted in the report.

    ``share``: this rank's part of the load-time image check and the ranks' exchange (every rank
    of a run calls this with its own; the result is the same on every rank, and the same as one
    process's, the default)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_data_source(cfg)
    name = cfg.train.dataset
    raw = DATASETS[name](cfg.dataset_config, tokenizer, split, cfg.train,
                         **({"share": share} if name in SHARE_AWARE else {}))
    verdicts = check_shared(raw.rows, raw.image_refs, share) if raw.image_refs is not None else None
    out = finalize(raw, split=split, context_length=cfg.train.context_length, overlong=cfg.train.overlong,
                   skip_bad_rows=cfg.train.skip_bad_rows, image_check=None if verdicts is None else verdicts.check_of)
    if verdicts is not None:
        out.report.images_checked = verdicts.checked
    return out
