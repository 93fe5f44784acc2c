"""Training metrics: an in-memory log of records, ``metrics.jsonl`` (appended per save point),
``metrics.json`` (llama-recipes' file, rewritten from the log) and PNG plots.

``metrics.jsonl`` is the append-only record: one JSON object per line, each with a ``kind``
(``run``, ``step``, ``epoch``, ``val``, ``flop_counter``) and the same keys as ``metrics.json``.
A save point appends the lines recorded since the previous one, so its cost does not grow with
the run, a crash loses at most what was not yet saved (a torn last line is skipped by readers),
and ``tail -f`` / ``pandas.read_json(lines=True)`` follow a run as it goes. The first write of a
run replaces the file (a fresh run, or a resumed one whose history is cut at its checkpoint).

``metrics.json`` keeps llama-recipes' shape (one list per key: ``train_step_loss``,
``val_epoch_perplexity``...) for the scripts and tools that read it, and is rewritten atomically
from the same records at every save point; shardtune adds steps, learning rates, tokens/s,
TFLOP/s, MFU and memory (see docs/training.md).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

from ..outputs import ownership
from ..outputs.atomic import atomic_write
from .dpo import PREFERENCE_METRICS
from .types import LoopResult, StepResult

JSONL = "metrics.jsonl"
JSON = "metrics.json"

# Keys of metrics.json per kind of record; the first group of each is llama-recipes' own (or was
# there before the throughput and memory figures) and is always written, even empty.
STEP_KEYS = ("train_step", "train_step_loss", "train_step_perplexity", "train_step_lr", "train_step_tokens_per_s")
STEP_PERF_KEYS = ("train_step_tflops", "train_step_mfu", "train_step_host_rss_gib",
                  "train_step_gpu_max_allocated_gib", "train_step_gpu_max_reserved_gib")
EPOCH_KEYS = ("train_epoch_loss", "train_epoch_perplexity", "train_epoch_tokens_per_s", "epoch_time_s")
EPOCH_PERF_KEYS = ("train_epoch_step", "train_epoch_tflops", "train_epoch_mfu", "train_epoch_host_rss_max_gib",
                   "train_epoch_gpu_max_allocated_gib", "train_epoch_gpu_max_reserved_gib")
VAL_KEYS = ("val_step", "val_epoch_loss", "val_epoch_perplexity")
# --use_dpo (train/dpo.py): the rewards, margin and accuracy of each step's and evaluation's pairs
STEP_PREFERENCE_KEYS = tuple(f"train_step_{name}" for name in PREFERENCE_METRICS)
VAL_PREFERENCE_KEYS = tuple(f"val_{name}" for name in PREFERENCE_METRICS)
KEYS = {"step": STEP_KEYS + STEP_PERF_KEYS + STEP_PREFERENCE_KEYS, "epoch": EPOCH_KEYS + EPOCH_PERF_KEYS,
        "val": VAL_KEYS + VAL_PREFERENCE_KEYS}
ALWAYS = set(STEP_KEYS + EPOCH_KEYS + VAL_KEYS)

# metrics.json key -> the scalar's name in TensorBoard and W&B (x axis: the optimizer step).
TAGS = {
    "train_step_loss": "train/loss", "train_step_perplexity": "train/perplexity", "train_step_lr": "train/lr",
    "train_step_tokens_per_s": "train/tokens_per_s", "train_step_tflops": "train/tflops_per_device",
    "train_step_mfu": "train/mfu", "train_step_host_rss_gib": "memory/host_rss_gib",
    "train_step_gpu_max_allocated_gib": "memory/gpu_max_allocated_gib",
    "train_step_gpu_max_reserved_gib": "memory/gpu_max_reserved_gib",
    "train_epoch_loss": "train/epoch_loss", "train_epoch_perplexity": "train/epoch_perplexity",
    "train_epoch_tokens_per_s": "train/epoch_tokens_per_s", "epoch_time_s": "train/epoch_time_s",
    "train_epoch_tflops": "train/epoch_tflops_per_device", "train_epoch_mfu": "train/epoch_mfu",
    "train_epoch_host_rss_max_gib": "memory/epoch_host_rss_max_gib",
    "train_epoch_gpu_max_allocated_gib": "memory/epoch_gpu_max_allocated_gib",
    "train_epoch_gpu_max_reserved_gib": "memory/epoch_gpu_max_reserved_gib",
    "val_epoch_loss": "eval/loss", "val_epoch_perplexity": "eval/perplexity",
    **{f"train_step_{name}": f"train/{name}" for name in PREFERENCE_METRICS},
    **{f"val_{name}": f"eval/{name}" for name in PREFERENCE_METRICS},
}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def step_record(r: StepResult) -> dict:
    rec = {"kind": "step", "train_step": r.step, "train_step_loss": r.loss, "train_step_perplexity": _ppl(r.loss),
           "train_step_lr": r.lr, "train_step_tokens_per_s": r.tokens_per_s}
    if r.perf is not None:
        p = r.perf
        rec.update(train_step_tflops=p.tflops, train_step_mfu=p.mfu, train_step_host_rss_gib=p.host_rss_gib,
                   train_step_gpu_max_allocated_gib=p.gpu_max_allocated_gib,
                   train_step_gpu_max_reserved_gib=p.gpu_max_reserved_gib)
    rec.update({f"train_step_{k}": v for k, v in r.extra.items()})
    return _without_none(rec)


def epoch_record(train: LoopResult, step: Optional[int] = None) -> dict:
    rec = {"kind": "epoch", "train_epoch_loss": train.loss, "train_epoch_perplexity": train.perplexity,
           "train_epoch_tokens_per_s": train.tokens_per_s, "epoch_time_s": train.seconds, "train_epoch_step": step}
    if train.perf is not None:
        p = train.perf
        rec.update(train_epoch_tflops=p.tflops, train_epoch_mfu=p.mfu, train_epoch_host_rss_max_gib=p.host_rss_max_gib,
                   train_epoch_gpu_max_allocated_gib=p.gpu_max_allocated_gib,
                   train_epoch_gpu_max_reserved_gib=p.gpu_max_reserved_gib)
    return _without_none(rec)


def val_record(step: int, val: LoopResult) -> dict:
    return {"kind": "val", "val_step": step, "val_epoch_loss": val.loss, "val_epoch_perplexity": val.perplexity,
            **{f"val_{k}": v for k, v in val.extra.items()}}


def scalars(record: dict) -> dict[str, float]:
    """A record's values under their TensorBoard / W&B names."""
    return {TAGS[k]: float(v) for k, v in record.items() if k in TAGS and v is not None}


def _without_none(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if v is not None}


def _step_of(rec: dict) -> Optional[int]:
    return rec.get("train_step", rec.get("val_step", rec.get("train_epoch_step", rec.get("step"))))


class MetricsLog:
    """The run's records in order. A step hook (``after_step``); the recipe adds epochs,
    validations and run facts. Columns of metrics.json read as attributes: ``log.train_step_loss``."""

    def __init__(self, records: Iterable[dict] = ()) -> None:
        self.records: list[dict] = list(records)
        self.info: dict = {}  # run-level facts (peak FLOP/s, world size): metrics.json's top level
        self._written = 0  # records already in metrics.jsonl
        self._replace = True  # the run's first write replaces the file

    def __getattr__(self, name: str) -> list:
        for kind, keys in KEYS.items():
            if name in keys:
                return self.column(kind, name)
        raise AttributeError(name)

    def column(self, kind: str, key: str) -> list:
        return [r.get(key) for r in self.records if r["kind"] == kind]

    # StepHook interface: the train loop calls these.
    def before_step(self, step: int) -> None:
        pass

    def after_step(self, r: StepResult) -> None:
        if r.skipped:  # no update and a NaN loss: not a point of the curves
            return
        self.records.append(step_record(r))

    def add_epoch(self, train: LoopResult, step: Optional[int] = None) -> None:
        self.records.append(epoch_record(train, step))

    def add_validation(self, step: int, val: LoopResult) -> None:
        self.records.append(val_record(step, val))

    def add_flop_count(self, record: dict) -> None:
        self.records.append({"kind": "flop_counter", **record})

    @classmethod
    def continued(cls, output_dir: str | Path, *, step: int, epochs_done: int) -> "MetricsLog":
        """The log of a resumed run: the history up to the checkpoint's ``step`` (later records
        were trained after the checkpoint and are redone), from metrics.jsonl (or an older run's
        metrics.json), or an empty log."""
        records = read_records(Path(output_dir) / JSONL)
        if not records:
            records = records_from_columns(_read_json(Path(output_dir) / JSON))
        kept, epochs = [], 0
        for rec in records:
            kind = rec.get("kind")
            if kind == "epoch":
                epochs += 1
                if epochs <= epochs_done:
                    kept.append(rec)
            elif kind in ("step", "val", "flop_counter") and (_step_of(rec) or 0) <= step:
                kept.append(rec)
        return cls(kept)

    def to_dict(self) -> dict:
        """metrics.json: one list per key (llama-recipes' keys always, the others when recorded)."""
        data: dict = {}
        for kind, keys in KEYS.items():
            for key in keys:
                values = self.column(kind, key)
                if key in ALWAYS or any(v is not None for v in values):
                    data[key] = values
        flops = [r for r in self.records if r["kind"] == "flop_counter"]
        if flops:
            data["flop_counter"] = {k: v for k, v in flops[-1].items() if k != "kind"}
        data.update(self.info)
        return data

    def write(self, output_dir: str | Path) -> Path:
        """Append the new records to metrics.jsonl, rewrite metrics.json (atomically) and the
        plots; returns the metrics.json path. Main process only."""
        from .plots import plot_metrics, plots_for

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        ownership.record(out, added=[JSONL, JSON, *plots_for(data)])  # before the files exist
        log = out / JSONL
        if self._replace:  # the run's first write: its whole history, replacing an earlier run's
            lines = [{"kind": "run", **self.info}] + self.records
            atomic_write(log, "".join(json.dumps(r) + "\n" for r in lines))
            self._replace = False
        elif self._written < len(self.records):
            with open(log, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.records[self._written:]))
                f.flush()
                os.fsync(f.fileno())
        self._written = len(self.records)
        path = out / JSON
        atomic_write(path, json.dumps(data))
        plot_metrics(data, out)
        return path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_records(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (a torn or damaged line, such as the last one after a crash
    mid-append, is skipped); empty when there is no file."""
    records = []
    try:
        text = Path(path).read_text()
    except OSError:
        return records
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "kind" in rec:
            records.append(rec)
    return records


def records_from_columns(data: dict) -> list[dict]:
    """metrics.json's lists back into records (step, then epoch, then validation order)."""
    records = []
    for kind, keys in KEYS.items():
        present = [k for k in keys if isinstance(data.get(k), list)]
        length = max((len(data[k]) for k in present), default=0)
        for i in range(length):
            rec = {"kind": kind}
            rec.update({k: data[k][i] for k in present if i < len(data[k]) and data[k][i] is not None})
            records.append(rec)
    return records


def load_metrics(path: str | Path) -> dict:
    """metrics.json's dict from either file: a metrics.json, or a metrics.jsonl (rebuilt)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        records = read_records(path)
        log = MetricsLog(r for r in records if r["kind"] != "run")
        for rec in records:
            if rec["kind"] == "run":
                log.info = {k: v for k, v in rec.items() if k != "kind"}
        return log.to_dict()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a JSON file: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a metrics object (a JSON mapping of lists)")
    return data
