"""The ``shardtune`` command: one subcommand each, dispatched to its module in the command layer.

    shardtune finetune [--nproc_per_node N] [--nnodes N ...] <llama-recipes flags | --config f.yaml | k=v>
    shardtune data [training flags] [--show N|all] [--json] [--split train|test]
    shardtune demo [--vision | --dpo] [--output_dir DIR] [--nproc_per_node N] [--seed S]
    shardtune generate PATH --prompt "..." [--prompt_file F] [--chat] [--output F] [--image IMG]
    shardtune chat PATH [--system "..."]
    shardtune checkpoints CHECKPOINT_FOLDER
    shardtune convert SRC DST [--model HF_DIR] [--dtype bf16] [--verify]
    shardtune inspect PATH
    shardtune plan --size 70b --enable_fsdp --nnodes 2 --nproc_per_node 8 [training flags] [--json]
    shardtune eval MODEL_OR_ADAPTER_DIR [--tasks T1,T2 --include_path DIR | --dataset ... (quick)]
    shardtune plot METRICS_JSON [--output_dir DIR]
"""

from __future__ import annotations

import contextlib
import sys
from typing import Optional, Sequence

from .exits import run_with_clean_errors
from .parallel.launch import split_launch_args

USAGE = """usage: shardtune <command> [options]

commands:
  finetune   fine-tune a model (llama-recipes flags; --help-config lists them, --print-config
             shows the resolved config); --nproc_per_node N launches N ranks with torchrun
  data       what a run would train on, loaded as training loads it (same flags): a summary and the
             first --show N samples with their trained tokens marked (--json: input_ids + labels)
  demo       tiny Llama fine-tuned end to end on CPU: before/after accuracy, HF output
             (--vision: a tiny Llama 3.2 Vision model on an image question; --dpo: preference
             tuning, held-out preference accuracy before/after)
  generate   generate text from any model a run left: an HF directory, a PEFT adapter, a step
             checkpoint, llama-recipes' .distcp folder or .pt file (--prompt_file, stdin, --chat,
             --output F; --image IMG: ask a vision model about an image)
  chat       talk with a model (same PATH kinds) through its chat template; /reset, /exit
  checkpoints  list a run's resumable checkpoints (step, epoch, eval loss, size, completeness)
  convert    any FSDP checkpoint (shardtune, llama-recipes .distcp or .pt, PEFT adapter) -> HF model
  inspect    what a checkpoint is, without loading its tensors
  plan       memory per GPU and per host, checkpoint sizes and step time of a run, and what to
             change when it does not fit (--size 8b|70b|... or --model_name, training flags)
  eval       evaluate a model or adapter: loss, perplexity and exact match on a dataset split, or
             lm-evaluation-harness tasks (--tasks; pip install 'shardtune[eval]')
  plot       loss, perplexity, throughput (tokens/s, MFU) and memory PNGs of a run's metrics.json

run `shardtune <command> --help` for a command's options."""

def _finetune(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Every llama-recipes option is accepted; `shardtune finetune --help-config` lists them.")
        return
    launch, rest = split_launch_args(argv)
    nproc = 1
    for i, tok in enumerate(launch):
        if tok.startswith("--nproc_per_node"):
            value = tok.partition("=")[2] or launch[i + 1]
            nproc = int(value) if value.isdigit() else nproc
    if launch and (nproc > 1 or any(t.startswith("--nnodes") for t in launch)):
        # Validate here first so a bad flag or path fails once, not once per rank. preflight is a
        # light module: this launcher never imports the recipe (transformers, peft, bitsandbytes).
        from .config import parse_args

        cfg = parse_args(rest).config  # a bad flag or value: refused before torch is imported
        from .preflight import hold_outputs, preflight

        preflight(cfg, nproc)
        single_node = not any(t.startswith(("--nnodes", "--rdzv", "--master_", "--node_rank")) for t in launch)
        if single_node and "--standalone" not in launch:
            launch.append("--standalone")  # a free local port: two jobs on one machine never collide
        from .parallel.launch import run_torchrun

        # --output_dir is this job's until every rank has ended. Across nodes, global rank 0 takes
        # the lock instead: each node's launcher would otherwise lock a shared folder against the others.
        # Each rank runs `-m shardtune finetune` (this CLI, which runs the recipe in-process): a
        # package's __main__, like `-m shardtune.finetuning`, which multiprocessing does not run
        # again in the DataLoader workers (data/workers.py).
        with hold_outputs(cfg, launcher=True) if single_node else contextlib.nullcontext():
            code = run_torchrun([*launch, "-m", "shardtune", "finetune", *rest], local_ranks=nproc)
        if code:
            raise SystemExit(code)
        return
    from .config import parse_args

    # flag and value errors before any heavy import: the config layer imports no torch (0.2 s, not 2)
    parsed = parse_args(rest)
    checked = None
    if not (parsed.help_config or parsed.print_config):
        from .preflight import check_run

        # Refused here, before the recipe's imports (~7 s CPU): most bad inputs end in preflight.
        checked = check_run(parsed.config)
    from .finetuning import main as finetune_main

    finetune_main(rest, checked)


def _data(argv: list[str]) -> None:
    from .data.cli import main as data_main

    data_main(argv)


def _demo(argv: list[str]) -> None:
    from .demo.run import main as demo_main

    demo_main(argv)


def _generate(argv: list[str]) -> None:
    from .commands.generate import main as generate_main

    generate_main(argv)


def _chat(argv: list[str]) -> None:
    from .commands.chat import main as chat_main

    chat_main(argv)


def _checkpoints(argv: list[str]) -> None:
    from .commands.checkpoints import main as checkpoints_main

    checkpoints_main(argv)


def _convert(argv: list[str]) -> None:
    from .convert.cli import convert_main

    convert_main(argv)


def _inspect(argv: list[str]) -> None:
    from .convert.cli import inspect_main

    inspect_main(argv)


def _eval(argv: list[str]) -> None:
    from .eval.cli import main as eval_main

    eval_main(argv)


def _plan(argv: list[str]) -> None:
    from .plan.cli import main as plan_main

    plan_main(argv)


def _plot(argv: list[str]) -> None:
    from .commands.plot import main as plot_main

    plot_main(argv)


COMMANDS = {"finetune": _finetune, "demo": _demo, "generate": _generate, "chat": _chat, "checkpoints": _checkpoints,
            "data": _data, "convert": _convert, "inspect": _inspect, "eval": _eval, "plan": _plan,
            "plot": _plot}


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" Did you mean `shardtune {close[0]}`?" if close else ""
        print(f"error: unknown command {command!r}.{hint}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    run_with_clean_errors(lambda: COMMANDS[command](rest))
