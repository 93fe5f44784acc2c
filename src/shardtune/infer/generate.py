"""Generation from a model in memory: batches of text prompts (left-padded), chat turns through
the tokenizer's template, and a vision model's turns through its processor, with the decoding
options of :class:`Sampling` (``infer/sampling.py``). The ``shardtune generate`` and ``shardtune chat`` commands
(``commands/generate.py``, ``commands/chat.py``) and the evaluation use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config.errors import ShardtuneError
from ..model.loading import text_tokenizer
from .prompts import Prompt
from .sampling import Sampling

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


def vision_inputs(processor, prompt: str | list[dict], image=None):
    """The processor's tensors for one prompt (text, or a chat's messages), about ``image`` if
    given (see :func:`vision_prompt`)."""
    if isinstance(prompt, list):  # a chat: the image goes at the start of the first user turn
        messages, placed = [], image is None
        for m in prompt:
            content = [{"type": "text", "text": m["content"]}]
            if not placed and m["role"] == "user":
                content.insert(0, {"type": "image"})
                placed = True
            messages.append({"role": m["role"], "content": content})
        text, add_special = processor.apply_chat_template(messages, add_generation_prompt=True), False
    else:
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


def chat_text(tokenizer, messages: list[dict]) -> str:
    """``messages`` through the tokenizer's chat template, ending with the assistant's header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ShardtuneError(
            "A chat (--chat, `shardtune chat`, or a prompt row with \"messages\") needs a tokenizer with a chat "
            "template, and this model's has none (a base model). Give plain prompts without --chat, or use an "
            "instruct model (or save a chat_template in its tokenizer_config.json).")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _token_ids(tokenizer, prompt: Prompt, chat: bool) -> list[int]:
    if prompt.messages is not None or chat:
        messages = prompt.messages or [{"role": "user", "content": prompt.text}]
        # the template writes BOS itself; the tokenizer would add a second
        return tokenizer(chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt.text)["input_ids"]


def _left_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """A batch whose prompts all end at the last column, where generation continues."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _text_batch(model, tokenizer, prompts: list[Prompt], sampling: Sampling, chat: bool, streamer) -> list[str]:
    rows = [_token_ids(tokenizer, p, chat) for p in prompts]
    inputs = _left_padded(rows, tokenizer.pad_token_id, model.device)
    is_chat = chat or any(p.messages is not None for p in prompts)
    stop = {"eos_token_id": chat_stop_ids(model, tokenizer)} if is_chat else {}
    with torch.no_grad():
        out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                             **sampling.generate_kwargs(), **stop)
    width = inputs["input_ids"].shape[1]
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def _vision_one(model, processor, prompt: Prompt, sampling: Sampling, image, streamer) -> str:
    tok = text_tokenizer(processor)
    request = prompt.messages if prompt.messages is not None else prompt.text
    inputs = vision_inputs(processor, request, image).to(model.device, dtype=model.dtype)  # pixels in the model's dtype
    with torch.no_grad():
        out = model.generate(**inputs, pad_token_id=tok.pad_token_id, streamer=streamer,
                             eos_token_id=chat_stop_ids(model, tok), **sampling.generate_kwargs())
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_batch(model, inputs, prompts: list[Prompt], sampling: Sampling = Sampling(), *, chat: bool = False,
                   batch_size: int = 8, image=None, streamer=None) -> list[str]:
    """The completion (new text only) of each prompt, in order.

    ``inputs`` is a text model's tokenizer or a vision model's processor. Text prompts go in
    left-padded batches of ``batch_size``; a vision model's one at a time, about ``image`` (or
    the prompt's own ``image`` path). The RNG is seeded from ``sampling.seed`` first, so the same
    prompts, settings and model give the same text."""
    torch.manual_seed(sampling.seed)
    tok = text_tokenizer(inputs)
    if tok is inputs:
        if image is not None or any(p.image for p in prompts):
            raise ShardtuneError("--image needs a vision model (e.g. Llama 3.2 Vision); this one is a text model.")
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            out += _text_batch(model, tok, prompts[start:start + batch_size], sampling, chat, streamer)
        return out
    return [_vision_one(model, inputs, p, sampling, load_image(p.image) if p.image else image, streamer)
            for p in prompts]


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, image=None) -> str:
    """Complete one ``prompt`` (a vision model: a chat turn about ``image``); the new text only."""
    return generate_batch(model, tokenizer, [Prompt(text=prompt)],
                          Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
                          image=image)[0]


INFERENCE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                    "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def inference_dtype(name: str, device: str) -> Optional[torch.dtype]:
    """``--dtype``: ``auto`` is fp32 on a CPU (bf16 matmuls are ~10x slower there) and the stored
    dtype on a GPU (None)."""
    if name == "auto":
        return torch.float32 if device == "cpu" else None
    if name not in INFERENCE_DTYPES:
        raise ShardtuneError(f"--dtype must be auto, fp32, bf16 or fp16, got {name!r}.")
    return INFERENCE_DTYPES[name]


def default_device() -> str:
    """cuda when a GPU is visible, else cpu: what ``--device`` means when it is not given."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ShardtuneError(f"--device {device} was given but no CUDA GPU is visible. Use --device cpu.")
    if device != "cpu" and not device.startswith("cuda"):
        raise ShardtuneError(f"--device must be cpu or cuda (or cuda:N), got {device!r}.")
