"""``shardtune generate``: text generation from an HF model directory or a PEFT adapter directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config.errors import ShardtuneError
from ..model.loading import check_model_source, load_tokenizer


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
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, str(p))
        tok_src = str(p) if (p / "tokenizer_config.json").is_file() else base
    else:
        check_model_source(path, "MODEL")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok_src = path
    return model.to(device).eval(), load_tokenizer(tok_src)


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


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="shardtune generate", description=__doc__)
    ap.add_argument("model", help="HF model directory, or PEFT adapter directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--base", help="base model for an adapter (default: the one it records)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    model, tokenizer = load_for_inference(args.model, args.base, args.device)
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p))
