"""Images of vision samples: references resolved and checked at load time, opened by the collator.

A sample keeps its images as *references* (an absolute path, a place in a parquet file or a
``datasets`` dataset (``stored_images.py``), the encoded bytes of a data URL, or an already
decoded PIL image), so samples stay small and picklable; :class:`VisionCollator` reads and opens
them per batch and runs the processor's image processor.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..batches import IGNORE_INDEX
from ..config.errors import ShardtuneError
from .collate import pad_token_id
from .rows import BadRow
from .stored_images import StoredImage

ImageRef = Union[str, StoredImage, bytes, Any]  # absolute path | stored image | encoded image | PIL image
IMAGE_TOKEN = "<|image|>"
_DATA_URL = "data:image/"


def image_ref(value: Any, k: int, base: Optional[Path]) -> ImageRef:
    """Row field ``images[k]`` -> a reference; a relative path is resolved against ``base`` (the
    data file's folder). Accepts a path, a ``data:image/...;base64,`` URL, raw bytes, an HF
    ``Image`` feature as stored (``{"bytes": ..., "path": ...}``), a stored image (its bytes left in
    the source, already checked) or a PIL image."""
    if is_pil(value) or isinstance(value, StoredImage):
        return value
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return _resolve(value["path"], k, base)
        raise BadRow(f"has image {k} with neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise BadRow(f"has an empty image {k} (0 bytes)")
        return bytes(value)
    if isinstance(value, str):
        if value.startswith(_DATA_URL):
            try:
                return base64.b64decode(value.split(",", 1)[1], validate=True)
            except (ValueError, IndexError) as e:
                raise BadRow(f"has image {k} as a data URL whose base64 payload does not decode "
                             f"({e})") from None
        if not value.strip():
            raise BadRow(f"has an empty path as image {k}")
        return _resolve(value, k, base)
    raise BadRow(f"has image {k} of type {type(value).__name__}; expected a file path, bytes, "
                 f"{{'bytes': ..., 'path': ...}} or a PIL image")


def _resolve(path: str, k: int, base: Optional[Path]) -> str:
    p = Path(path).expanduser()
    resolved = p if p.is_absolute() or base is None else base / p
    if not resolved.is_file():
        how = "" if p.is_absolute() else (f" ({path!r} is resolved against the data file's folder "
                                          f"{base})" if base is not None else f" (relative to {Path.cwd()})")
        what = "is a folder, not an image file" if resolved.is_dir() else "does not exist"
        raise BadRow(f"names image {k} {resolved.resolve()}, which {what}{how}")
    return str(resolved.resolve())


def is_pil(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def describe(ref: ImageRef) -> str:
    if isinstance(ref, str):
        return ref
    if isinstance(ref, bytes):
        return f"{len(ref)} bytes of image data"
    if isinstance(ref, StoredImage):
        return f"{ref.nbytes} bytes of image data at {ref.where()}"
    return "a decoded image"


def check_image(ref: ImageRef, k: int) -> None:
    """Raise BadRow unless ``ref`` decodes as an image (:func:`image_problem_of`), so a corrupt or
    truncated file fails at load time, not mid-training."""
    problem = image_problem_of(ref, k)
    if problem:
        raise BadRow(problem)


def image_problem_of(ref: ImageRef, k: int) -> str:
    """What the load-time check finds wrong with image ``k`` (a BadRow message; "" if nothing).
    PNG: ``verify`` (every chunk's checksum, no pixel decoding); JPEG: a full decode at 1/8 scale
    (``draft``), cheap and still reading the whole stream (JPEG's ``verify`` checks nothing); other
    formats: a full decode. A decoded image passes. A stored image checked when its row was read
    gives what that check found; one not checked then (another rank's share) is read now."""
    if is_pil(ref):
        return ""
    if isinstance(ref, StoredImage):
        if ref.problem is not None:
            return ref.problem
        return image_problem(io.BytesIO(ref.load() or b""), k, describe(ref))
    return image_problem(ref if isinstance(ref, str) else io.BytesIO(ref), k, describe(ref))


def image_problem(source: Any, k: int, label: str) -> str:
    """What is wrong with the image in ``source`` (a path or a file object), as a BadRow message
    about image ``k`` (named by ``label``); "" when it decodes (see :func:`check_image`)."""
    from PIL import Image

    try:
        with Image.open(source) as im:
            if 0 in im.size:
                return f"has image {k} ({label}) of size {im.size[0]}x{im.size[1]}"
            if im.format == "PNG":
                im.verify()
            else:
                im.draft("RGB", (1, 1))  # JPEG only; a no-op for other formats
                im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        # PIL names a file object by its repr, a memory address: the same image gives the same
        # message in every process (ranks exchange these messages, image_checks.py)
        text = str(e) if isinstance(source, str) else str(e).replace(repr(source), "<image data>")
        return f"has an unreadable image {k} ({label}): {type(e).__name__}: {text}"
    return ""


def check_stored(data: bytes, k: int, ref: StoredImage) -> str:
    """The load-time check of a stored image's bytes, while its row is read."""
    return image_problem(io.BytesIO(data), k, describe(ref))


def open_image(ref: ImageRef):
    """The referenced image, decoded, in RGB (as the Mllama image processor expects)."""
    from PIL import Image

    if is_pil(ref):
        return ref.convert("RGB")
    try:
        if isinstance(ref, StoredImage):
            ref_bytes = ref.load()
            source = io.BytesIO(ref_bytes if ref_bytes is not None else b"")
        else:
            source = ref if isinstance(ref, str) else io.BytesIO(ref)
        with Image.open(source) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise ShardtuneError(f"Could not decode the image {describe(ref)} while building a batch "
                             f"({type(e).__name__}: {e}); it passed the check at load time, so the "
                             "file is truncated or changed since. Replace or remove it.") from None


def image_token_id(processor) -> int:
    """The id of the token that stands for one image in a vision processor's text."""
    from ..model.loading import text_tokenizer

    token_id = getattr(processor, "image_token_id", None)
    return int(token_id if token_id is not None else text_tokenizer(processor).convert_tokens_to_ids(IMAGE_TOKEN))


class VisionCollator:
    """Batches encoded vision samples (``input_ids``, ``labels``, ``attention_mask``, ``images``)
    into the seven tensors Mllama takes, exactly as ``processor(images=..., text=..., padding=True)``
    would for the same token ids: ids right-padded with the pad token, labels -100 and attention 0
    on pads, ``pixel_values``/``aspect_ratio_ids``/``aspect_ratio_mask`` from the processor's image
    processor, and ``cross_attention_mask`` built from the padded ids.
    """

    pads_to_longest = True  # the loader counts pad_fraction from sample lengths
    packable = False        # the loader refuses --batching_strategy packing

    def __init__(self, processor) -> None:
        from ..model.loading import text_tokenizer

        tokenizer = text_tokenizer(processor)
        self.image_processor = processor.image_processor
        self.pad_id = pad_token_id(tokenizer)
        self.image_token_id = image_token_id(processor)
        self.max_tiles = int(self.image_processor.max_image_tiles)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

        width = max(len(s["input_ids"]) for s in samples)
        ids, labels, mask, images = [], [], [], []
        for s in samples:
            n_pad = width - len(s["input_ids"])
            ids.append(list(s["input_ids"]) + [self.pad_id] * n_pad)
            labels.append(list(s["labels"]) + [IGNORE_INDEX] * n_pad)
            mask.append(list(s.get("attention_mask") or [1] * len(s["input_ids"])) + [0] * n_pad)
            # a truncated sample keeps only the images whose tokens survived
            n_images = min(len(s["images"]), sum(t == self.image_token_id for t in s["input_ids"]))
            if n_images == 0:
                raise ShardtuneError(
                    "A vision sample lost all its image tokens to truncation (--context_length "
                    f"cut it to {len(s['input_ids'])} tokens). Raise --context_length, or use "
                    "--overlong drop.")
            images.append([open_image(ref) for ref in s["images"][:n_images]])
        pixels = self.image_processor(images=images, return_tensors="pt")
        num_tiles = pixels.pop("num_tiles")
        sparse = [get_cross_attention_token_mask(row, self.image_token_id) for row in ids]
        cross = convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles=num_tiles,
                                                             max_num_tiles=self.max_tiles, length=width)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        out.update({k: torch.as_tensor(v) for k, v in pixels.items()})
        out["cross_attention_mask"] = torch.from_numpy(cross)
        return out
