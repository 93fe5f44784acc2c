"""``--dataset ocrvqa_dataset``: the_cauldron-style image + conversation rows for Llama 3.2 Vision.

A row is ``{"images": [image, ...], "texts": [{"user": str, "assistant": str}, ...]}`` (other
keys, such as the_cauldron's ``source``, are ignored). Where rows come from
(``--ocrvqa_dataset.data_path``):

* a ``.jsonl`` / ``.json`` / ``.parquet`` file; images are file paths (relative to the data file's
  folder, or absolute), ``data:image/...;base64,`` URLs, raw bytes, or ``{"bytes", "path"}`` dicts
  as Hugging Face ``Image`` features are stored in parquet;
* a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or ``DatasetDict``);
* empty: ``datasets.load_dataset(hub_name, name=subset)`` from the Hugging Face Hub.
  Folders and the hub need the optional ``datasets`` package (``pip install 'shardtune[hub]'``).

Splits: a ``DatasetDict`` with both ``train_split`` and ``test_split`` is used as it is. Any other
source is one split (a ``DatasetDict``'s ``train_split``, or its only split), divided as
llama-recipes' ``train_test_split(test_size=1 - split_ratio, shuffle=True, seed=42)`` does:
``ceil((1 - split_ratio) * n)`` rows, the first of a permutation drawn from
``numpy.random.default_rng(42)``, are the test split and the rest the train split, in that order.
The split is fixed (it does not follow ``--seed``), so evaluations of different runs compare.
``max_rows`` keeps the first N rows of the source before it is split.

Each row is encoded at load time with the processor's chat template (images as ``{"type":
"image"}`` parts at the start of the first user turn) into ``input_ids``, ``labels`` and
``attention_mask`` plus its image references; labels are -100 except on each assistant answer and
the end-of-turn token that closes it. Images are checked to open at load time, each rank checking
its share of the rows and the ranks exchanging what they found (``image_checks.py``);
:class:`~shardtune.data.images.VisionCollator` decodes them per batch. Samples hold references,
not image bytes: images embedded in a parquet file or a ``datasets`` dataset stay there until a
batch reads them (``stored_images.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Optional

from ..config.configs import ChatTrainOn, ocrvqa_dataset, train_config
from ..config.errors import ShardtuneError
from .image_checks import ONE_PROCESS, Check, Share
from .images import VisionCollator, check_image, image_ref
from .rows import BadRow, RawSplit
from .vision_sources import FLAG, SPLIT_SEED, check_source, read_source, split_indices

__all__ = ["FLAG", "SPLIT_SEED", "VisionCollator", "check_source", "encode", "load", "messages",
           "split_indices"]


# --- encoding --------------------------------------------------------------------------------

def _turns(row: Any) -> list[tuple[str, str]]:
    if not isinstance(row, Mapping):
        raise BadRow(f"is a {type(row).__name__}, expected an object with 'images' and 'texts'")
    texts = row.get("texts")
    if not texts:
        raise BadRow("has no text: 'texts' is missing or empty (expected a list of "
                     "{\"user\": ..., \"assistant\": ...} turns)")
    if not isinstance(texts, (list, tuple)):
        raise BadRow(f"field 'texts' is a {type(texts).__name__}, expected a list of turns")
    turns = []
    for t, turn in enumerate(texts):
        if not isinstance(turn, Mapping):
            raise BadRow(f"texts[{t}] is a {type(turn).__name__}, expected "
                         "{\"user\": ..., \"assistant\": ...}")
        pair = []
        for key in ("user", "assistant"):
            value = turn.get(key)
            if value is not None and not isinstance(value, str):
                raise BadRow(f"texts[{t}][{key!r}] is a {type(value).__name__}, expected a string")
            if not (value or "").strip():
                raise BadRow(f"texts[{t}] has an empty or missing {key!r} turn")
            pair.append(value.strip())  # as llama-recipes' collator does
        turns.append(tuple(pair))
    return turns


def _image_refs(row: Mapping, base: Optional[Path]) -> list:
    images = row.get("images")
    if images is None or (isinstance(images, (list, tuple)) and not images):
        raise BadRow("has no images ('images' is missing or empty); each row needs at least one")
    if not isinstance(images, (list, tuple)):
        images = [images]
    return [image_ref(v, k, base) for k, v in enumerate(images)]


def image_refs(row: Any, base: Optional[Path]) -> list:
    """The row's image references, after what ``encode`` checks before them (BadRow as it raises)."""
    _turns(row)
    return _image_refs(row, base)


def messages(turns: list[tuple[str, str]], n_images: int) -> list[dict]:
    """Chat messages: the images as parts at the start of the first user turn, then its text."""
    out = []
    for t, (user, assistant) in enumerate(turns):
        images = [{"type": "image"}] * (n_images if t == 0 else 0)
        out.append({"role": "user", "content": images + [{"type": "text", "text": user}]})
        out.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return out


def encode(row: Any, processor, template: str, base: Optional[Path], check: Check = check_image) -> dict[str, Any]:
    """One row -> ``input_ids``, ``labels``, ``attention_mask`` and ``images`` (references): the
    conversation encoded as ``chat_dataset`` encodes it (answers and their end-of-turn tokens
    located from the template's renderings). ``check(ref, k)`` raises BadRow for a bad image (by
    default it decodes it; ``load_split`` passes the ranks' agreed findings)."""
    from .chat_dataset import Encoder, encode_messages

    turns = _turns(row)
    refs = _image_refs(row, base)
    for k, ref in enumerate(refs):
        check(ref, k)
    enc = Encoder(processor, template, ChatTrainOn.assistant, context_length=0, cut_at_turn=False, base=base)
    return encode_messages(enc, messages(turns, len(refs)), None, refs)[0]


def chat_template(processor) -> str:
    """The processor's chat template, or a clear error for a processor that cannot be used."""
    from ..model.loading import text_tokenizer

    if getattr(processor, "image_processor", None) is None:
        raise ShardtuneError(
            "--dataset ocrvqa_dataset needs a vision model's processor (image processor + tokenizer), "
            f"but was given a {type(processor).__name__}. Use a Llama 3.2 Vision model as --model_name.")
    tokenizer = text_tokenizer(processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ShardtuneError(
            "The model's processor has no chat template, which --dataset ocrvqa_dataset needs to turn "
            "conversations into tokens. Use an Instruct model (e.g. Llama-3.2-11B-Vision-Instruct), or "
            "add its chat_template.jinja to the model folder.")
    if not getattr(tokenizer, "is_fast", False):
        raise ShardtuneError("--dataset ocrvqa_dataset needs a fast tokenizer (tokenizer.json) to locate "
                             "the answers for the labels; the model folder has only a slow one.")
    return template


def load(config: ocrvqa_dataset, processor, split: str, train: train_config, share: Share = ONE_PROCESS) -> RawSplit:
    """The split's rows; images embedded in the source are checked as they are read, and only in
    this rank's ``share`` of the rows (the others' are checked by their ranks)."""
    template = chat_template(processor)
    rows, where, base, source = read_source(config, split, share.owns)
    return RawSplit(source=source, rows=rows, where=where,
                    encode=partial(encode, processor=processor, template=template, base=base),
                    collate_fn=VisionCollator(processor), image_refs=partial(image_refs, base=base))
