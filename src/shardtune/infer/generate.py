"""``shardtune generate``: text generation from an HF model directory or a PEFT adapter directory."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config.errors import ShardtuneError
from ..model.loading import check_model_source, from_pretrained_checked, load_tokenizer


def load_for_inference(path: str, base: Optional[str] = None, device: str = "cpu",
                       dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) from a full HF dir, or from an adapter dir on top of its base model."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    adapter_cfg = p / "adapter_config.json"
    if adapter_cfg.is_file():
        from peft import PeftModel

        base = base or json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base:
            raise ShardtuneError(f"{path} is a PEFT adapter without a recorded base model; pass --base.")
        check_model_source(base, "--base")
        model = from_pretrained_checked(AutoModelForCausalLM, base, "--base", dtype=dtype)
        try:
            model = PeftModel.from_pretrained(model, str(p))
        except RuntimeError as exc:  # torch's "size mismatch for ...lora_A..." from load_state_dict
            if "size mismatch" not in str(exc):
                raise
            first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "")
            raise ShardtuneError(
                f"The adapter {path} does not fit the base model {base!r}: its weights have other shapes "
                f"({first[:200]}). It was trained on a different base model; pass that one with --base "
                "(the adapter records it in adapter_config.json as base_model_name_or_path).") from None
        tok_src = str(p) if (p / "tokenizer_config.json").is_file() else base
    else:
        check_model_source(path, "MODEL")
        model = from_pretrained_checked(AutoModelForCausalLM, path, "MODEL", dtype=dtype)
        tok_src = path
    return model.to(device).eval(), load_tokenizer(tok_src, "--base" if tok_src == base else "MODEL")


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0) -> str:
    """Complete ``prompt``; greedy when ``temperature`` is 0. Returns the new text only."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else None,
                             top_p=top_p if sample else None, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


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
    ap = argparse.ArgumentParser(prog="shardtune generate", description=__doc__)
    ap.add_argument("model", help="HF model directory, or PEFT adapter directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--base", help="base model for an adapter (default: the one it records)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (0 < top_p <= 1), with --temperature")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    check_options(args)
    model, tokenizer = load_for_inference(args.model, args.base, args.device)
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p))
