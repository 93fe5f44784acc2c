"""``shardtune eval``: evaluate a model, an adapter or a checkpoint, as it is (nothing is converted
on disk first).

    shardtune eval MODEL --dataset alpaca_dataset --alpaca_dataset.data_path eval.json [--split all]
        the quick evaluation (no extra package): loss and perplexity on a split of a dataset the
        recipe trains on, and the exact match of greedy answers against its references
    shardtune eval MODEL --tasks shardtune_demo --include_path examples/eval_tasks [--num_fewshot N]
        EleutherAI's lm-evaluation-harness (pip install 'shardtune[eval]'): tasks from its
        catalogue (data from the Hugging Face Hub) or from local task YAMLs (offline)

MODEL is whatever ``shardtune generate`` loads: an HF model directory, a PEFT adapter directory,
a shardtune step checkpoint, a llama-recipes ``.distcp`` folder or ``.pt`` file (``--model``
names the architecture when the checkpoint does not). The quick evaluation takes the recipe's dataset options (``--dataset``, ``--<dataset>.<field>``,
``--context_length``, ``--eval_fraction``, ``--config run.yaml``...). Both print a short table and
write a JSON file (``--output``, default ``eval_out/<model>-<quick|lm_eval>.json``); a file that
shardtune eval did not write is never replaced. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config.errors import ShardtuneError

_QUICK_ONLY = ("split", "max_new_tokens", "no_answers")
_TASKS_ONLY = ("include_path", "num_fewshot", "apply_chat_template")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: the recipe's dataset options pass through, and --data... must never be
    # taken for an abbreviation of one of these.
    ap = argparse.ArgumentParser(prog="shardtune eval", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # MODEL, --model/--base, --device and --dtype mean what they mean for `shardtune generate`.
    ap.add_argument("model", help="an HF model directory, a PEFT adapter directory, a shardtune step checkpoint, "
                                  "or a llama-recipes .distcp folder / .pt file")
    ap.add_argument("--model", "--base", dest="base",
                    help="the base model of an adapter (default: the one it records), or the architecture of a "
                         "checkpoint that does not name it (llama-recipes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda[:N] (default: cuda when a GPU is visible)")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, the stored dtype on GPU), fp32, bf16, fp16")
    ap.add_argument("--output", help="results JSON (default: eval_out/<model>-<quick|lm_eval>.json)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--limit", type=float,
                    help="only the first N samples (per task); for --tasks a value below 1 is a fraction")
    ap.add_argument("--log_samples", action="store_true", help="keep every sample's answer in the JSON")
    quick = ap.add_argument_group("quick evaluation (the default; plus the recipe's dataset options)")
    quick.add_argument("--quick", action="store_true", help="the quick evaluation (what runs without --tasks)")
    quick.add_argument("--split", default="test", choices=("test", "train", "all"),
                       help="test (default: the eval split the recipe validates on), train, or all "
                            "(both; for alpaca, every row of the file in order)")
    quick.add_argument("--max_new_tokens", type=int,
                       help="answer length limit (default: the longest reference + 4 tokens)")
    quick.add_argument("--no_answers", action="store_true", help="loss and perplexity only (no generation)")
    harness = ap.add_argument_group("lm-evaluation-harness (pip install 'shardtune[eval]')")
    harness.add_argument("--tasks", help="comma-separated lm-eval task names, globs or task YAML paths")
    harness.add_argument("--include_path", action="append", default=[],
                         help="a folder of task YAMLs (repeatable), e.g. examples/eval_tasks")
    harness.add_argument("--num_fewshot", type=int)
    harness.add_argument("--apply_chat_template", action="store_true",
                         help="wrap prompts in the tokenizer's chat template (instruct models)")
    return ap


def _check_options(args: argparse.Namespace, extra: list[str], defaults: argparse.Namespace) -> None:
    def given(name: str) -> bool:
        return getattr(args, name) != getattr(defaults, name)

    if args.tasks is not None and args.quick:
        raise ShardtuneError("--quick and --tasks choose two different evaluations; run them one at a time.")
    if args.tasks is not None:
        wrong = [f"--{n}" for n in _QUICK_ONLY if given(n)] + extra
        if wrong:
            raise ShardtuneError(f"{' '.join(wrong)}: not an option of an lm-eval run (--tasks). Dataset options "
                                 "and --split/--max_new_tokens/--no_answers belong to the quick evaluation; an "
                                 "lm-eval task brings its own data.")
    else:
        wrong = [f"--{n}" for n in _TASKS_ONLY if given(n)]
        if wrong:
            raise ShardtuneError(f"{', '.join(wrong)} only applies with --tasks (an lm-eval run).")
    if args.batch_size < 1:
        raise ShardtuneError(f"--batch_size must be at least 1, got {args.batch_size}.")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ShardtuneError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}.")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ShardtuneError(f"--num_fewshot must be 0 or more, got {args.num_fewshot}.")
    if args.limit is not None:
        fraction_ok = args.tasks is not None and 0 < args.limit < 1
        if not (math.isfinite(args.limit) and (fraction_ok or (args.limit >= 1 and args.limit.is_integer()))):
            fraction = "" if args.tasks is None else " or, with --tasks, a fraction between 0 and 1"
            raise ShardtuneError(f"--limit must be a whole number of samples (at least 1){fraction}; "
                                 f"got {args.limit:g}.")


def _check_model_path(path: str, flag: str) -> None:
    """A missing local path fails now, not after lm-eval's start-up; ``org/name`` may be a hub id."""
    if Path(path).expanduser().exists():
        return
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        return
    raise ShardtuneError(f"{flag} {path!r} does not exist. Pass a Hugging Face model directory, a PEFT "
                         "adapter directory, a shardtune step checkpoint or a llama-recipes .distcp folder or "
                         ".pt file (what `shardtune generate` loads).")


def _dataset_config(extra: list[str]):
    """The recipe's config from the dataset options that came with the command."""
    from ..config import parse_args
    from ..data import check_data_source

    names = {t[2:].partition("=")[0] for t in extra if t.startswith("--")}
    names |= {t.partition("=")[0] for t in extra if "=" in t and not t.startswith("-")}
    if not names & {"dataset", "train_config.dataset", "config"}:
        raise ShardtuneError(
            "The quick evaluation needs a dataset, given as the recipe takes it: for example "
            "--dataset alpaca_dataset --alpaca_dataset.data_path eval.json (or --config run.yaml). "
            "For an lm-eval run, pass --tasks.")
    cfg = parse_args(extra).config
    check_data_source(cfg)
    return cfg


def _device_and_dtype(args: argparse.Namespace) -> tuple[str, Optional[torch.dtype]]:
    from ..infer.generate import check_device, inference_dtype

    check_device(args.device)
    return args.device, inference_dtype(args.dtype, args.device)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    _check_options(args, extra, ap.parse_known_args([args.model])[0])
    kind = "lm_eval" if args.tasks is not None else "quick"
    _check_model_path(args.model, "MODEL")
    if args.base:
        _check_model_path(args.base, "--model")
    from .output import check_output, default_output, write_results

    output = Path(args.output) if args.output else default_output(args.model, kind)
    check_output(output, read_from=(args.model, args.base))
    device, dtype = _device_and_dtype(args)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)

    if kind == "quick":
        cfg = _dataset_config(extra)
        model, inputs = _load(args, device, dtype)
        from .quick import format_quick, quick_eval

        result = quick_eval(model, inputs, cfg, split=args.split, limit=limit, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, answers=not args.no_answers,
                            log_samples=args.log_samples)
        table = "\n".join(format_quick(result))
    else:
        from . import harness

        harness.require_lm_eval()
        include = harness.check_include_paths(args.include_path)
        names = [n.strip() for n in args.tasks.split(",") if n.strip()]
        if not names:
            raise ShardtuneError("--tasks is empty; name one or more lm-eval tasks, comma-separated.")
        manager, tasks = harness.task_manager(names, include)  # unknown tasks fail before the model loads
        model, inputs = _load(args, device, dtype)
        from ..model.loading import text_tokenizer

        if text_tokenizer(inputs) is not inputs:
            raise ShardtuneError(f"{args.model} is a vision model, fed by a processor; lm-eval's Hugging Face "
                                 "model (HFLM) feeds text only. Use the quick evaluation for it (loss on "
                                 "its dataset), or evaluate its text model.")
        result = harness.json_ready(harness.run_tasks(
            model, inputs, tasks, manager, num_fewshot=args.num_fewshot, limit=limit,
            batch_size=args.batch_size, log_samples=args.log_samples,
            apply_chat_template=args.apply_chat_template))
        table = harness.format_table(result)
    result = {"kind": kind, "model": args.model, "base": args.base, **result}
    print(table)
    print(f"results: {write_results(output, result)}")
    return result


def _load(args: argparse.Namespace, device: str, dtype: Optional[torch.dtype]):
    from ..infer.loading import load_for_inference

    return load_for_inference(args.model, args.base, device=device, dtype=dtype)
