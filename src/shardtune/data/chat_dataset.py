"""``--dataset chat_dataset``: multi-turn conversations rendered with the chat template.

Rows are OpenAI ``messages`` or ShareGPT ``conversations`` (``data/chat.py``). A sample's
``input_ids`` are exactly ``tokenizer.apply_chat_template(messages)``: the tokenizer's (or a
vision model's processor's) own template, or ``--chat_dataset.chat_template FILE``, which is then
also the template saved with the trained model (:func:`adopt_template`). Labels follow
``--chat_dataset.train_on`` (``assistant``: every assistant turn and its end-of-turn token;
``last``: only the final assistant turn; ``all``: every token), located from the template's own
renderings (``data/chat_masks.py``).

Where rows come from (``--chat_dataset.data_path``): a ``.json`` (list) / ``.jsonl`` / ``.parquet``
file, whose first ``eval_fraction`` of rows (at least one) is the test split and the rest the train
split; a folder holding ``<train_split>.<ext>`` and ``<test_split>.<ext>``; or a Hugging Face Hub
dataset name (``datasets.load_dataset(name, subset, split=...)``, needs the optional ``datasets``
package). With ``test_split ""`` a folder's or hub dataset's train split is divided as a file is.

An over-long conversation follows ``--overlong`` as other rows do, or with
``--chat_dataset.cut_at_turn`` keeps its leading whole turns that fit, up to an assistant turn
(the system message stays), rendered again by the template; one whose first answer does not fit
is dropped. Both are counted in the data report.
"""

from __future__ import annotations

import bisect
import importlib.util
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

from ..config.configs import ChatTrainOn, chat_dataset, train_config
from ..config.errors import ShardtuneError
from .chat import Conversation, conversation
from .chat_masks import NotIncremental, span_labels, turn_spans
from .files import FORMATS, read_records
from .hub import load_from_hub
from .image_checks import Check
from .images import IMAGE_TOKEN, VisionCollator, check_image, image_ref
from .rows import BadRow, Cut, Overlong, RawSplit, row_name, split_off_eval

FLAG = "--chat_dataset.data_path"
TEMPLATE_FLAG = "--chat_dataset.chat_template"


# --- the template ------------------------------------------------------------------------------

def _own_template(tokenizer) -> Optional[str]:
    from ..model.loading import text_tokenizer

    template = getattr(tokenizer, "chat_template", None) or getattr(text_tokenizer(tokenizer), "chat_template", None)
    if isinstance(template, dict):  # named templates (transformers' multi-template format)
        template = template.get("default")
    return template or None


def read_template_file(path: str) -> str:
    """The Jinja text of ``--chat_dataset.chat_template``: a ``.jinja`` (any text) file, or a
    ``chat_template.json`` / ``tokenizer_config.json`` holding a ``chat_template`` string."""
    p = Path(path)
    if not p.is_file():
        raise ShardtuneError(f"{TEMPLATE_FLAG} {path}: the file {'is a folder' if p.is_dir() else 'does not exist'}. "
                             "Point it at a Jinja chat template file (for example chat_template.jinja).")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            text = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            text = None
        if not isinstance(text, str):
            raise ShardtuneError(f"{TEMPLATE_FLAG} {path} is a JSON file without a \"chat_template\" string. "
                                 "Give a .jinja file, or a chat_template.json / tokenizer_config.json that holds one.")
    if not text.strip():
        raise ShardtuneError(f"{TEMPLATE_FLAG} {path} is empty. Give the Jinja chat template to render conversations with.")
    return text


def resolve_template(config: chat_dataset, tokenizer) -> str:
    """The template conversations are rendered with: the file, else the tokenizer's own."""
    if config.chat_template:
        return read_template_file(config.chat_template)
    template = _own_template(tokenizer)
    if not template:
        raise ShardtuneError(
            "--dataset chat_dataset renders conversations with a chat template, and there is none: the "
            "tokenizer of --model_name (or --tokenizer_name) has no chat_template. Give one with "
            f"{TEMPLATE_FLAG} FILE.jinja (it is saved with the trained model), or use a tokenizer that has "
            "one: an Instruct model's folder, or --tokenizer_name DIR whose tokenizer_config.json or "
            "chat_template.jinja holds it.")
    return template


def adopt_template(config: chat_dataset, tokenizer) -> Optional[str]:
    """Set ``--chat_dataset.chat_template``'s template on the tokenizer (and a processor) the run
    saves, so ``generate``, ``chat``, ``eval`` and serving engines render as training did. Returns a
    line for the log, or None when the tokenizer's own template is used."""
    from ..model.loading import text_tokenizer

    if not config.chat_template:
        return None
    template, own = read_template_file(config.chat_template), _own_template(tokenizer)
    for owner in {id(tokenizer): tokenizer, id(text_tokenizer(tokenizer)): text_tokenizer(tokenizer)}.values():
        owner.chat_template = template
    what = ("the tokenizer had none" if own is None else "equals the tokenizer's own" if own == template
            else "replaces the tokenizer's own")
    return f"chat template: {config.chat_template} ({what}; saved with the model)"


# --- encoding ----------------------------------------------------------------------------------

@dataclass
class Encoder:
    """What encoding a row needs; ``tokenizer`` is a vision model's processor where it has one."""

    tokenizer: Any
    template: str
    train_on: ChatTrainOn
    context_length: int
    cut_at_turn: bool
    base: Optional[Path]  # relative image paths are relative to the data file's folder

    @property
    def vision(self) -> bool:
        return getattr(self.tokenizer, "image_processor", None) is not None

    def render(self, tools, messages: list, generation_prompt: bool) -> str:
        if not messages:
            raise BadRow("starts with an assistant message; a conversation starts with a system or user message")
        kwargs = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt, **kwargs)
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError, the template's raise_exception
            raise BadRow(f"is refused by the chat template ({type(e).__name__}: {e})") from None

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]], int]:
        """(ids, character offsets, shift) of the rendered ``text``, as ``apply_chat_template``
        tokenises it (no special tokens added); a processor adds a BOS where the text has none."""
        from ..model.loading import text_tokenizer

        tok = text_tokenizer(self.tokenizer)
        shift = 0
        if self.vision and tok.bos_token:
            from transformers.models.mllama.processing_mllama import build_string_from_input

            moved = build_string_from_input(text, tok.bos_token, IMAGE_TOKEN)
            shift, text = len(moved) - len(text), moved
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"]), shift


def _image_parts(messages: list[dict]) -> int:
    return sum(sum(p["type"] == "image" for p in m["content"]) for m in messages if isinstance(m["content"], list))


def encode_messages(enc: Encoder, messages: list[dict], tools, images: list) -> tuple[dict, list]:
    """(sample, token offsets) of normalised ``messages`` (``images``: the references of their
    image parts, in order; ocrvqa_dataset's rows come here too)."""
    render = partial(enc.render, tools)
    full = render(messages, False)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if enc.train_on is ChatTrainOn.last:
        turns = turns[-1:]
    ids, offsets, shift = enc.tokenize(full)
    if enc.train_on is ChatTrainOn.all:
        labels = list(ids)
    else:
        labels = span_labels(ids, offsets, turn_spans(render, messages, full, turns), shift)
    sample: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}
    if enc.vision:
        from ..model.loading import text_tokenizer

        image_id = text_tokenizer(enc.tokenizer).convert_tokens_to_ids(IMAGE_TOKEN)
        n_tokens = sum(t == image_id for t in ids)
        if n_tokens != len(images):
            raise BadRow(f"has {len(images)} image(s) but its text renders {n_tokens} {IMAGE_TOKEN} tokens (does a message "
                         f"contain the literal {IMAGE_TOKEN!r}, or does the template drop image parts?)")
        sample["images"] = images
    return sample, offsets


def _image_refs(enc: Encoder, conv: Conversation) -> list:
    if not enc.vision:
        if conv.images:
            raise BadRow(f"has {len(conv.images)} image(s), but the model is a text model; train a Llama 3.2 "
                         "Vision model on it, or remove the images and their {\"type\": \"image\"} parts")
        return []
    if not conv.images:
        raise BadRow("has no image; every row for a Llama 3.2 Vision model needs at least one (its batches "
                     "must carry images), given in 'images' with a {\"type\": \"image\"} part each")
    return [image_ref(v, k, enc.base) for k, v in enumerate(conv.images)]


def image_refs(row: Any, enc: Encoder) -> list:
    """The row's image references, after what ``encode`` checks before them (BadRow as it raises)."""
    return _image_refs(enc, conversation(row))


def encode(row: Any, enc: Encoder, check: Check = check_image) -> Any:
    """One row -> a sample (``Cut`` when cut at a turn); BadRow or Overlong where it cannot be one.
    ``check(ref, k)`` raises BadRow for a bad image (see ``vision.encode``)."""
    conv = conversation(row)
    images = _image_refs(enc, conv)
    for k, ref in enumerate(images):
        check(ref, k)
    try:
        sample, offsets = encode_messages(enc, conv.messages, conv.tools, images)
    except NotIncremental:  # once more: a template that prints today's date may have crossed midnight
        sample, offsets = encode_messages(enc, conv.messages, conv.tools, images)
    if len(sample["input_ids"]) <= enc.context_length or not enc.cut_at_turn:
        return sample
    return Cut(_cut(enc, conv, images, offsets))


def _cut(enc: Encoder, conv: Conversation, images: list, offsets: list) -> dict:
    """The longest leading part of the conversation that ends with an assistant turn and fits."""
    starts = [start for start, _ in offsets]
    for k in reversed(conv.assistant_turns()[:-1]):
        kept = conv.messages[:k + 1]
        text = enc.render(conv.tools, kept, False)
        if bisect.bisect_left(starts, len(text)) > enc.context_length + 8:  # far too long: skip the re-encode
            continue
        n_images = _image_parts(kept)
        if enc.vision and n_images == 0:
            break
        sample, _ = encode_messages(enc, kept, conv.tools, images[:n_images])
        if len(sample["input_ids"]) <= enc.context_length:
            return sample
    raise Overlong()


# --- sources -----------------------------------------------------------------------------------

def check_source(config: chat_dataset) -> None:
    """Refuse, before any work, a chat dataset without a source, a template file that cannot be
    read, or a hub name without ``datasets``."""
    if not config.data_path:
        raise ShardtuneError(
            f"--dataset chat_dataset needs {FLAG}: a .json (a list of rows), .jsonl or .parquet file of "
            "conversations, a folder of <split>.<ext> files, or a Hugging Face Hub dataset name. A row is "
            "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]} or {\"conversations\": [{\"from\": ..., "
            "\"value\": ...}, ...]} (docs/datasets.md).")
    if config.chat_template:
        read_template_file(config.chat_template)  # a missing or empty file stops the launcher, not the ranks
    if _is_hub_name(config.data_path) and importlib.util.find_spec("datasets") is None:
        raise ShardtuneError(
            f"{FLAG} {config.data_path!r} is not a local file or folder, so it is read as a Hugging Face Hub "
            "dataset name, which needs the `datasets` package, and it is not installed. Install it (pip "
            "install 'shardtune[hub]'), or point the flag at a local .json, .jsonl or .parquet file.")


def _is_hub_name(data_path: str) -> bool:
    p = Path(data_path)
    return not p.exists() and p.suffix.lower() not in FORMATS and not data_path.startswith(("/", ".", "~"))


def _split_file(folder: Path, name: str) -> Path:
    for ext in FORMATS:
        if (folder / f"{name}{ext}").is_file():
            return folder / f"{name}{ext}"
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise ShardtuneError(
        f"{folder} has no file for the {name!r} split (looked for {name}{{{','.join(FORMATS)}}}; it holds "
        f"{present}). Add it, set --chat_dataset.train_split / test_split to the file stems (test_split \"\" holds "
        f"out --eval_fraction of the train split), or point {FLAG} at a single file.")


def read_split(config: chat_dataset, split: str, eval_fraction: float):
    """(rows, where, source name, base folder for relative image paths) of ``split``."""
    check_source(config)
    path = Path(config.data_path).expanduser()
    one_source = not config.test_split  # the train split is divided by eval_fraction
    name = config.train_split if split == "train" or one_source else config.test_split
    if path.is_file():
        rows, where = read_records(path, flag=FLAG)
        source, base, one_source = str(path), path.parent, True
    elif path.is_dir():
        file = _split_file(path, name)
        rows, where = read_records(file, flag=FLAG)
        source, base = str(file), file.parent
    elif not _is_hub_name(config.data_path):
        rows, where = read_records(path, flag=FLAG)  # says the file does not exist
        source, base = str(path), None
    else:
        hint = (f"Download it where you have access and point {FLAG} at a .json/.jsonl/.parquet file, or check "
                f"the name, --chat_dataset.subset and --chat_dataset.{'train' if name == config.train_split else 'test'}"
                f"_split ({name!r}; test_split \"\" holds out --eval_fraction of the train split).")
        ds = load_from_hub(f"the chat dataset {config.data_path!r} split {name!r}", hint, config.data_path,
                           config.subset or None, split=name)
        rows, where, source, base = ds.to_list(), row_name, f"{config.data_path}:{name}", None
    if str(source).lower().endswith(".csv"):
        raise ShardtuneError(f"{source}: chat rows hold lists of messages, which CSV cannot; use a .json, .jsonl "
                             "or .parquet file.")
    if one_source:
        rows, offset = split_off_eval(rows, split, eval_fraction, source)
        return rows, (lambda i: where(i + offset)), source, base
    return rows, where, source, base


def load(config: chat_dataset, tokenizer, split: str, train: train_config) -> RawSplit:
    from ..model.loading import text_tokenizer

    template = resolve_template(config, tokenizer)
    if not getattr(text_tokenizer(tokenizer), "is_fast", False):
        raise ShardtuneError("--dataset chat_dataset needs a fast tokenizer (tokenizer.json) to locate the "
                             "assistant turns for the labels; the model folder has only a slow one.")
    rows, where, source, base = read_split(config, split, train.eval_fraction)
    enc = Encoder(tokenizer, template, ChatTrainOn(config.train_on), train.context_length, config.cut_at_turn, base)
    return RawSplit(source=source, rows=rows, where=where, encode=partial(encode, enc=enc),
                    collate_fn=VisionCollator(tokenizer) if enc.vision else None,
                    image_refs=partial(image_refs, enc=enc) if enc.vision else None)
