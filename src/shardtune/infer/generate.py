"""``shardtune generate``: generation from an HF model directory or a PEFT adapter directory.

A text model completes ``--prompt`` as plain text. A vision model (Llama 3.2 Vision) is fed by its
processor: ``--prompt`` becomes a user turn of the processor's chat template, with ``--image`` at
its start, and the answer is the assistant's turn. A vision model without ``--image`` answers
from the text alone (Mllama then skips its cross-attention layers), as transformers allows.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config.errors import ShardtuneError
from ..model.loading import text_tokenizer
from .loading import load_for_inference, model_family

# Llama 3's end-of-turn marker: a chat answer ends there (the model's EOS may come only later).
END_OF_TURN = "<|eot_id|>"


def load_image(path: str):
    """The RGB image at ``path``; a missing or unreadable file is a clear error."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise ShardtuneError(f"--image {path!r} does not exist (or is not a file). Pass a PNG or JPEG file.")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ShardtuneError(f"--image {path!r} could not be read as an image ({exc}). Pass a PNG or JPEG "
                             "file that an image viewer opens.") from None


def vision_prompt(processor, prompt: str, with_image: bool) -> tuple[str, bool]:
    """``(text, add_special_tokens)`` for ``prompt`` as a user turn of the processor's chat template
    (the image, if any, at its start) followed by the assistant's header, as ``ocrvqa_dataset``
    trains. A processor without a chat template gets the plain prompt after the image token, as
    base (non-instruct) vision models expect."""
    if getattr(processor, "chat_template", None):
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return text, False  # the template already starts with BOS; the tokenizer would add a second
    return (processor.image_token if with_image else "") + prompt, True


def vision_inputs(processor, prompt: str, image=None):
    """The processor's tensors for one prompt, about ``image`` if given (see :func:`vision_prompt`)."""
    text, add_special = vision_prompt(processor, prompt, image is not None)
    images = [image] if image is not None else None
    return processor(images=images, text=text, add_special_tokens=add_special, return_tensors="pt")


def chat_stop_ids(model, tokenizer) -> list[int]:
    """Where a chat answer ends: the model's EOS ids, the tokenizer's, and Llama 3's end-of-turn."""
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    if END_OF_TURN in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(END_OF_TURN))
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, image=None) -> str:
    """Complete ``prompt``; greedy when ``temperature`` is 0. Returns the new text only.

    ``tokenizer`` is a text model's tokenizer (plain completion) or a vision model's processor (a
    chat turn, about ``image`` if given)."""
    tok = text_tokenizer(tokenizer)
    stop = {}
    if tok is tokenizer:
        if image is not None:
            raise ShardtuneError("--image needs a vision model (e.g. Llama 3.2 Vision); this one is a text model.")
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    else:  # pixel values in the model's dtype (the processor gives fp32)
        inputs = vision_inputs(tokenizer, prompt, image).to(model.device, dtype=model.dtype)
        stop = {"eos_token_id": chat_stop_ids(model, tok)}
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else None,
                             top_p=top_p if sample else None, pad_token_id=tok.pad_token_id, **stop)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def check_options(args: argparse.Namespace) -> None:
    """Sampling and device options that would be ignored or fail later are refused here."""
    if args.max_new_tokens < 1:
        raise ShardtuneError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}.")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ShardtuneError(f"--temperature must be 0 (greedy decoding) or positive (sampling), got "
                             f"{args.temperature}.")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise ShardtuneError(f"--top_p must be above 0 and at most 1, got {args.top_p}.")
    if args.top_p < 1 and args.temperature == 0:
        raise ShardtuneError("--top_p only applies when sampling; add --temperature (e.g. 0.7) or drop --top_p.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ShardtuneError(f"--device {args.device} was given but no CUDA GPU is visible. Use --device cpu.")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ShardtuneError(f"--device must be cpu or cuda (or cuda:N), got {args.device!r}.")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="shardtune generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="HF model directory, or PEFT adapter directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--image", help="an image file (PNG, JPEG...) for a vision model; the prompt is asked about it")
    ap.add_argument("--base", help="base model for an adapter (default: the one it records)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (0 < top_p <= 1), with --temperature")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    check_options(args)
    image = None
    if args.image is not None:  # refused before the model is loaded
        family = model_family(args.model, args.base)
        if not family.uses_processor:
            raise ShardtuneError(
                f"--image needs a vision model (e.g. Llama 3.2 Vision), but {args.model} is a text model "
                f"({family.name} family). Drop --image, or pass a vision model or an adapter trained on one.")
        image = load_image(args.image)
    model, inputs = load_for_inference(args.model, args.base, args.device)
    print(generate(model, inputs, args.prompt, args.max_new_tokens, args.temperature, args.top_p, image))
