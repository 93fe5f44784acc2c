"""Command lines: ``shardtune convert`` / ``python -m shardtune.convert`` and ``shardtune inspect``.

    shardtune convert SRC DST [--model CONFIG_OR_HF_DIR] [--dtype bf16|fp16|fp32|keep]
                      [--max_shard_size 5GB] [--verify] [--overwrite] [--merge]
    python -m shardtune.convert --fsdp_checkpoint_path SRC --consolidated_model_path DST \\
                      [--HF_model_path_or_name MODEL]        (llama-recipes' converter flags)
    shardtune inspect PATH [--model M] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ..config.errors import ShardtuneError
from .conversion import DTYPE_CHOICES
from .core import convert
from .inspection import format_report, inspect_path

CONVERT_DESCRIPTION = """Convert a checkpoint into a Hugging Face model folder (config, tokenizer,
sharded safetensors), streaming one output shard at a time. SRC may be a shardtune step-N folder
or run folder (latest is taken), a llama-recipes sharded (DCP) checkpoint, a FULL_STATE_DICT .pt
or other torch.save state dict, or a PEFT adapter folder (with --merge). DST must be new or empty
(or pass --overwrite); it is written atomically."""


def _convert_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shardtune convert", description=CONVERT_DESCRIPTION)
    ap.add_argument("src", nargs="?", help="the checkpoint (folder or file)")
    ap.add_argument("dst", nargs="?", help="the Hugging Face folder to write")
    ap.add_argument("--model", "--HF_model_path_or_name", "--hf_model_path_or_name", "--HF-model-path-or-name",
                    dest="model", default=None, metavar="MODEL",
                    help="HF model folder, its config.json, or hub id the checkpoint belongs to (default: "
                         "recorded in train_params.yaml / the adapter config / a config.json next to SRC); "
                         "also where config, tokenizer and processor files are copied from")
    ap.add_argument("--fsdp_checkpoint_path", "--fsdp-checkpoint-path", dest="src_flag", default=None, metavar="SRC",
                    help="llama-recipes spelling of SRC")
    ap.add_argument("--consolidated_model_path", "--consolidated-model-path", dest="dst_flag", default=None, metavar="DST",
                    help="llama-recipes spelling of DST")
    ap.add_argument("--dtype", default="keep", choices=DTYPE_CHOICES,
                    help="dtype of the written weights (default keep: the checkpoint's own)")
    ap.add_argument("--max_shard_size", "--max-shard-size", default="5GB",
                    help="largest output file (and the most tensor data held in memory), e.g. 5GB, 500MB")
    ap.add_argument("--verify", action="store_true",
                    help="reload DST with from_pretrained and compare tensors and logits with the source")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty DST (once the new one is complete)")
    ap.add_argument("--merge", action="store_true",
                    help="fold a LoRA adapter into its base model and write a full model")
    ap.add_argument("--tokenizer", default=None, help="folder to copy the tokenizer from (default: the model's)")
    return ap


def convert_main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _convert_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    src = _one(args.src, args.src_flag, "SRC", "--fsdp_checkpoint_path")
    dst = _one(args.dst, args.dst_flag, "DST", "--consolidated_model_path")
    return convert(src, dst, model=args.model or None, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   verify=args.verify, overwrite=args.overwrite, merge=args.merge, tokenizer=args.tokenizer)


def _one(positional: Optional[str], flag: Optional[str], name: str, flag_name: str) -> str:
    if positional and flag and positional != flag:
        raise ShardtuneError(f"{name} is given twice ({positional!r} and {flag_name} {flag!r}); pass it once.")
    value = positional or flag
    if not value:
        raise ShardtuneError(f"{name} is missing: shardtune convert SRC DST (or {flag_name} {name}).")
    return value


def inspect_main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="shardtune inspect",
                                 description="What a checkpoint is, from its metadata (no tensor is loaded).")
    ap.add_argument("path", help="a checkpoint folder or file (any kind shardtune convert reads)")
    ap.add_argument("--model", default=None, help="model folder or config.json, when the checkpoint does not record it")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    report = inspect_path(args.path, model=args.model)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return report
