"""``shardtune generate``: text from any model a run left (see ``infer/loading.py``).

Prompts come from ``--prompt`` (repeatable), ``--prompt_file`` or stdin (``infer/prompts.py``).
A text model completes a prompt as plain text, or, with ``--chat`` (or a JSONL row with
``messages``), answers it as a user turn of the tokenizer's chat template. Text prompts are
generated in batches of ``--batch_size``, left-padded. Decoding is greedy unless
``--temperature`` > 0; ``--seed`` makes sampling repeatable. One prompt is streamed to the
terminal as it is generated; ``--output F`` writes a JSON line per prompt (``prompt``,
``completion``: the generated text only).

A vision model (Llama 3.2 Vision) is fed by its processor: a prompt becomes a user turn of the
processor's chat template, with ``--image`` at its start, and the answer is the assistant's turn
(one prompt at a time). Without ``--image`` it answers from the text alone (Mllama then skips
its cross-attention layers), as transformers allows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..config.errors import ShardtuneError
from ..infer.prompts import Prompt, check_messages, parse_lines, read_prompt_file
from ..infer.sampling import Sampling
from ..outputs.atomic import atomic_file

# torch, transformers and the model readers (infer/generate.py, infer/loading.py) are imported once
# the options, prompts and --output are checked: a refusal then takes 0.1 s, not 2-5 s.


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """The options ``generate`` and ``chat`` share: where the model is and how it decodes."""
    ap.add_argument("model", help="an HF model directory, a PEFT adapter directory, a shardtune step checkpoint, "
                                  "or a llama-recipes .distcp folder / .pt file")
    ap.add_argument("--model", "--base", dest="base",
                    help="the base model of an adapter (default: the one it records), or the architecture of a "
                         "checkpoint that does not name it (llama-recipes)")
    ap.add_argument("--image", help="an image file (PNG, JPEG...) for a vision model; the prompt is asked about it")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (0 < top_p <= 1), with --temperature")
    ap.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest tokens (0: off), with --temperature")
    ap.add_argument("--repetition_penalty", type=float, default=1.0, help="1.0: off")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling RNG")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, the stored dtype on GPU), fp32, bf16, fp16")


def sampling_of(args: argparse.Namespace) -> Sampling:
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                        args.seed)
    sampling.check()
    return sampling


def check_device_option(args: argparse.Namespace) -> None:
    """``--device`` checked, and resolved when not given (this imports torch)."""
    from ..infer.generate import check_device, default_device

    args.device = args.device or default_device()
    check_device(args.device)


def image_for(args: argparse.Namespace, prompts: Sequence[Prompt] = ()):
    """``--image`` loaded; images (``--image`` or a prompt row's) are refused before the model is
    loaded when the model is a text model, and a missing prompt image is reported up front."""
    if args.image is None and not any(p.image for p in prompts):
        return None
    from ..infer.generate import load_image
    from ..infer.loading import model_family

    family = model_family(args.model, args.base)
    if not family.uses_processor:
        raise ShardtuneError(
            f"--image needs a vision model (e.g. Llama 3.2 Vision), but {args.model} is a text model "
            f"({family.name} family). Drop --image (and prompt images), or pass a vision model or an adapter trained on one.")
    for p in prompts:
        if p.image and not Path(p.image).is_file():
            raise ShardtuneError(f"The prompt image {p.image!r} does not exist (paths in a prompt file are "
                                 "relative to the file).")
    return load_image(args.image) if args.image is not None else None


def _prompts(args: argparse.Namespace) -> list[Prompt]:
    given = [bool(args.prompt), args.prompt_file is not None]
    if sum(given) > 1:
        raise ShardtuneError("Give prompts one way: --prompt (repeatable) or --prompt_file (or stdin, with neither).")
    if args.prompt:
        if any(not p for p in args.prompt):
            raise ShardtuneError("--prompt must not be empty.")
        return [Prompt(text=p) for p in args.prompt]
    if args.prompt_file is not None:
        return read_prompt_file(args.prompt_file)
    if sys.stdin is None or sys.stdin.isatty():
        raise ShardtuneError("No prompt: pass --prompt \"...\", --prompt_file FILE, or pipe prompts on stdin "
                             "(one a line, or JSONL).")
    prompts = parse_lines(sys.stdin, "stdin")
    if not prompts:
        raise ShardtuneError("stdin held no prompt (it was empty or blank).")
    return prompts


def check_output(path: str, args: argparse.Namespace) -> Path:
    """``--output`` may not replace an existing file (unless --overwrite) nor land in the model's folder."""
    out = Path(path)
    if out.is_dir():
        raise ShardtuneError(f"--output {path!r} is a directory; pass a file name, e.g. {path.rstrip('/')}/completions.jsonl.")
    if out.exists() and not args.overwrite:
        raise ShardtuneError(f"--output {path!r} already exists; shardtune does not replace it. Choose another name, "
                             "or pass --overwrite to replace it.")
    for given in (args.model, args.base):
        if given and Path(given).exists() and Path(given).is_dir() and out.resolve().is_relative_to(Path(given).resolve()):
            raise ShardtuneError(f"--output {path!r} is inside the model folder {given!r}, which generation only "
                                 "reads; write it elsewhere.")
    if not out.parent.exists():
        raise ShardtuneError(f"--output {path!r}: its folder {str(out.parent)!r} does not exist.")
    return out


def write_records(out: Path, prompts: list[Prompt], completions: list[str]) -> None:
    """One JSON object a line, written to a temporary name and renamed: a failed run leaves no half file."""
    with atomic_file(out) as f:
        for p, c in zip(prompts, completions):
            record = {"prompt": p.shown, "completion": c}
            if p.messages is not None:
                record["messages"] = p.messages
            if p.image:
                record["image"] = p.image
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="shardtune generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ap)
    ap.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    ap.add_argument("--prompt_file", help="a text file (a prompt a line) or JSONL (\"prompt\" or \"messages\" a row)")
    ap.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to each prompt")
    ap.add_argument("--batch_size", type=int, default=8, help="prompts generated together (left-padded)")
    ap.add_argument("--output", help="write a JSON line per prompt (prompt, completion) to this file")
    ap.add_argument("--overwrite", action="store_true", help="let --output replace an existing file")
    args = ap.parse_args(argv)
    sampling = sampling_of(args)
    if args.batch_size < 1:
        raise ShardtuneError(f"--batch_size must be at least 1, got {args.batch_size}.")
    prompts = _prompts(args)
    for p in prompts:
        if p.messages is not None:
            check_messages(p.messages, "prompt")
    out = check_output(args.output, args) if args.output else None
    check_device_option(args)
    image = image_for(args, prompts)  # refused before the model is loaded
    from ..infer.generate import generate_batch, inference_dtype
    from ..infer.loading import load_for_inference
    from ..model.loading import text_tokenizer

    model, inputs = load_for_inference(args.model, args.base, args.device, inference_dtype(args.dtype, args.device))
    if len(prompts) == 1 and out is None:  # one prompt: streamed as it is generated
        from transformers import TextStreamer

        streamer = TextStreamer(text_tokenizer(inputs), skip_prompt=True, skip_special_tokens=True)
        generate_batch(model, inputs, prompts, sampling, chat=args.chat, image=image, streamer=streamer)
        return
    completions = generate_batch(model, inputs, prompts, sampling, chat=args.chat, batch_size=args.batch_size,
                                 image=image)
    if out is not None:
        write_records(out, prompts, completions)
        print(f"wrote {len(completions)} completions to {out}")
        return
    for i, (p, c) in enumerate(zip(prompts, completions), 1):
        print(f"[{i}] {p.shown}\n{c}\n")
