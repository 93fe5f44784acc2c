"""The six steps of every ``shardtune demo``: :func:`run_demo`, told what differs by a :class:`DemoTask`.

1. build a random-initialised tiny base model and its tokenizer or processor (no downloads);
2. write the synthetic task data, with held-out rows that are never trained on;
3. score the untrained model on the held-out rows;
4. fine-tune with the real recipe (``shardtune.finetuning``) on 2 FSDP ranks launched with
   torchrun by default (``nproc=1``: in this process);
5. load the saved Hugging Face directory back with plain ``transformers``, score it again, show a
   few examples and where the model and its metrics are;
6. convert the run's sharded (DCP) checkpoint with ``shardtune convert`` and check that it gives
   the same logits as the model of step 5 (with one process there is no sharded checkpoint, and
   this step is skipped).

A :class:`DemoTask` holds everything that differs between the text demo (``shardtune.demo.run``)
and the vision demo (``shardtune.demo.vision``): the model, the data, the scoring, the recipe's
dataset and tuned flags, and a few words for the messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ..config.errors import ShardtuneError
from ..output_lock import OutputLock, hold
from ..outputs.ownership import check_output_dir, check_writable, record

# One intra-op thread: at this size a second thread saves only ~30% of a step on an idle machine,
# and on a busy shared one (other work on the cores) two threads were 2-4x *slower* per step.
NUM_THREADS = 1
# "learned": held-out accuracy at least this, and at least DemoTask.min_gain above the untrained model's.
LEARNED_ACCURACY = 0.8
# The converted checkpoint and the recipe's HF output hold the same fp32 weights.
CONVERT_TOLERANCE = 1e-5
# Held-out rows whose logits step 6 compares (one batch).
N_LOGIT_ROWS = 8

Rows = list[dict]
# What a demo writes in its --output_dir (each folder whole): recorded in the ownership marker.
DEMO_ENTRIES = ("base-model/", "data/", "model/", "converted/")


@dataclass(frozen=True)
class DemoTask:
    """What one demo is; :func:`run_demo` does the six steps with it. ``model`` and ``processor``
    below are what ``model_class`` / ``processor_class`` load (a tokenizer for a text model)."""

    # Words for the messages.
    model_label: str  # step 1: "building a tiny random <model_label>"
    data_label: str  # step 2: "writing the <data_label>"
    row_noun: str  # what a held-out row is, plural: "rows", "images"
    example_format: str  # the header of step 5's example lines
    # Steps 1 and 2: (directory, seed), and (directory, n_train, n_eval, seed) -> (the training
    # file the recipe reads, the held-out rows).
    build_base: Callable[[Path, int], None]
    write_data: Callable[[Path, int, int, int], tuple[Path, Rows]]
    n_train: int
    n_eval: int
    # Steps 3 and 5. Class names in ``transformers``, so that it is imported only when a demo runs
    # and the messages can name what a user would call.
    model_class: str
    processor_class: str
    accuracy: Callable[[Any, Any, Rows], float]  # (model, processor, rows) -> fraction right
    show_examples: Callable[[Any, Any, Rows], list[str]]  # (model, processor, rows) -> lines
    # Step 4: the recipe's --dataset (its <dataset>.data_path gets the training file) and the
    # flags the demo was tuned with; global_batch is split over the ranks.
    dataset: str
    train_flags: tuple[str, ...]
    global_batch: int
    # Step 6: (processor, rows) -> the model inputs both models' logits are compared on.
    logit_inputs: Callable[[Any, Rows], Mapping[str, torch.Tensor]]
    before_note: str = ""  # appended to step 3's accuracy line
    accuracy_label: str = "task accuracy"  # what ``accuracy`` measures, in the messages
    min_gain: float = 0.5  # "learned" also needs after >= before + min_gain
    try_it: Optional[Callable[[Path, Rows], str]] = None  # (model dir, held-out rows) -> a command


def finetune_args(task: DemoTask, model_dir: Path, data: Path, out: Path, seed: int, nproc: int = 1) -> list[str]:
    """The recipe's command line for ``task``: its dataset and tuned flags, on CPU, on ``nproc`` ranks."""
    per_rank = str(task.global_batch // nproc)
    fsdp = ["--enable_fsdp"] if nproc > 1 else []
    # --keep_last_n 1: step 6 needs only the newest sharded checkpoint, and the demo keeps no more.
    return ["--model_name", str(model_dir), "--dataset", task.dataset,
            f"--{task.dataset}.data_path", str(data), "--output_dir", str(out),
            "--save_metrics", "--seed", str(seed), "--device", "cpu", *fsdp,
            "--batch_size_training", per_rank, "--val_batch_size", per_rank,
            "--keep_last_n", "1", "--num_workers_dataloader", "0", *task.train_flags]


def run_finetune(args: list[str], nproc: int, out: Path) -> dict:
    """The real recipe: in this process, or on ``nproc`` FSDP ranks launched the way a user launches
    them (``shardtune finetune --nproc_per_node N``): its launcher checks the options once and ends
    a failed rank with one line, not torchrun's ``ChildFailedError`` traceback."""
    if nproc == 1:
        from ..finetuning import main as finetune

        return finetune(args)
    cmd = [sys.executable, "-m", "shardtune", "finetune", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(NUM_THREADS)}
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        print(f"the demo stopped at step 4: the {nproc}-rank fine-tune failed (its error is above).",
              file=sys.stderr, flush=True)
        raise SystemExit(code)
    metrics = json.loads((out / "metrics.json").read_text())
    val = metrics.get("val_epoch_loss") or []
    return {"best_eval_loss": min(val) if val else None, "steps": len(metrics["train_step_loss"])}


def from_pretrained(class_name: str, path: Path) -> Any:
    """``transformers.<class_name>.from_pretrained(path)``, imported only now (it is slow to import)."""
    import transformers

    return getattr(transformers, class_name).from_pretrained(path)


def convert_checkpoint(task: DemoTask, ft_args: list[str], dst: Path, reference: Any, processor: Any,
                       rows: Rows) -> float:
    """Convert the run's newest sharded checkpoint to ``dst`` (``shardtune convert``) and return the
    largest logit difference to ``reference`` (the recipe's own HF output) on ``rows``."""
    from ..checkpoint.layout import latest_checkpoint
    from ..config import parse_args
    from ..convert.core import convert
    from ..checkpoint.manager import checkpoint_run_dir

    run = checkpoint_run_dir(parse_args(ft_args).config)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise ShardtuneError(f"the fine-tune left no complete sharded checkpoint under {run}.")
    print(f"[6/6] converting the sharded checkpoint {ckpt} (DCP, one file per rank) to {dst}")
    convert(ckpt, dst, overwrite=True, log=lambda line: print("     ", line))
    converted = from_pretrained(task.model_class, dst).eval()
    inputs = task.logit_inputs(processor, rows)
    with torch.no_grad():
        a = converted(**inputs).logits
        b = reference.eval()(**inputs).logits
    return float((a - b).abs().max())


def run_demo(task: DemoTask, output_dir: str | Path, seed: int = 0, nproc: int = 2) -> dict:
    """The six steps above, writing under ``output_dir``; returns the accuracies before and after,
    the recipe's results and (with ``nproc > 1``) the conversion's largest logit difference.
    Raises ``SystemExit(1)`` if the model did not learn or the converted checkpoint differs."""
    if not 1 <= nproc <= task.global_batch or task.global_batch % nproc:
        raise ShardtuneError(f"--nproc_per_node must divide the demo's global batch of {task.global_batch}.")
    root = Path(output_dir)
    lock = claim_output_dir(root)
    try:
        return _run_demo(task, root, seed, nproc)
    finally:
        lock.release()


def claim_output_dir(root: Path) -> OutputLock:
    """The demo follows ``finetune``'s ownership rules: it writes only into a new or empty folder, or
    its own earlier output (a rerun), records its folders before writing them, and holds the folder
    for its whole run. Anything else is refused before a file is written."""
    check_output_dir(root, flag="--output_dir", overwrite=False, overwrite_flag=None)
    check_writable(root, "--output_dir")
    lock = hold(root)
    record(root, added=DEMO_ENTRIES)
    return lock


def _run_demo(task: DemoTask, root: Path, seed: int, nproc: int) -> dict:
    torch.set_num_threads(NUM_THREADS)
    base_dir, model_out, data_dir = root / "base-model", root / "model", root / "data"
    started = time.perf_counter()
    print(f"[1/6] building a tiny random {task.model_label} in {base_dir}")
    task.build_base(base_dir, seed)
    print(f"[2/6] writing the {task.data_label} to {data_dir}: "
          f"{task.n_train} train / {task.n_eval} held-out {task.row_noun}")
    train_file, eval_rows = task.write_data(data_dir, task.n_train, task.n_eval, seed)

    processor = from_pretrained(task.processor_class, base_dir)
    before_model = from_pretrained(task.model_class, base_dir)
    before = task.accuracy(before_model, processor, eval_rows)
    print(f"[3/6] {task.accuracy_label} before fine-tuning: {before:.1%}{task.before_note}")
    del before_model

    ft_args = finetune_args(task, base_dir, train_file, model_out, seed, nproc)
    where = f"{nproc} FSDP ranks (torchrun, gloo)" if nproc > 1 else "one process"
    print(f"[4/6] fine-tuning on {where}: shardtune.finetuning " + " ".join(ft_args))
    results = run_finetune(ft_args, nproc, model_out)

    print(f"[5/6] loading {model_out} with plain {task.model_class} + {task.processor_class}")
    after_model = from_pretrained(task.model_class, model_out)
    after_processor = from_pretrained(task.processor_class, model_out)
    after = task.accuracy(after_model, after_processor, eval_rows)
    learned = after >= LEARNED_ACCURACY and after >= before + task.min_gain
    print()
    print(f"examples ({task.example_format}):")
    for line in task.show_examples(after_model, after_processor, eval_rows[:3]):
        print("   ", line)
    print()
    print(f"{task.accuracy_label} on {len(eval_rows)} held-out {task.row_noun}: before {before:.1%}  ->  "
          f"after {after:.1%}   ({'learned' if learned else 'DID NOT LEARN'})")
    best_eval = results.get("best_eval_loss")
    best_eval = "n/a" if best_eval is None else f"{best_eval:.4f}"
    print(f"best eval loss {best_eval}, {results['steps']} optimizer steps, "
          f"{time.perf_counter() - started:.0f}s so far")
    print(f"model (Hugging Face format, {task.model_class} + {task.processor_class}): {model_out}")
    print(f"metrics: {model_out / 'metrics.json'}   loss plot: {model_out / 'loss.png'}")
    if task.try_it is not None:
        print(f"try it: {task.try_it(model_out, eval_rows)}")
    if not learned:
        raise SystemExit(1)

    print()
    summary = {"before": before, "after": after, "results": results}
    if nproc == 1:  # one process without FSDP writes no sharded checkpoint
        print("[6/6] skipped: one process without FSDP writes no sharded checkpoint to convert "
              "(the default, 2 FSDP ranks, does)")
        return summary
    converted_dir = root / "converted"
    logit_rows = eval_rows[:N_LOGIT_ROWS]
    diff = convert_checkpoint(task, ft_args, converted_dir, after_model, after_processor, logit_rows)
    same = diff <= CONVERT_TOLERANCE
    # The test of each demo reads "max |logit difference| <diff> (<verdict>)".
    print(f"converted checkpoint vs saved model: max |logit difference| {diff:.2e} "
          f"({'the same model' if same else 'DIFFERENT'}) on {len(logit_rows)} held-out {task.row_noun}; "
          f"{task.model_class}.from_pretrained({str(converted_dir)!r}) loads it")
    print(f"done in {time.perf_counter() - started:.0f}s")
    if not same:
        raise SystemExit(1)
    return {**summary, "convert_max_diff": diff}
