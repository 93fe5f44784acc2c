"""What ``--resume`` does with each setting that differs from the checkpoint's.

A checkpoint records the config it was trained with (``train_params.yaml``), the number of ranks,
and how its data position is counted (the rows' fingerprint, the global batch size and the seed:
``DataRecord``). On resume every changed setting falls into one class, and one start-up line per
setting says which:

* **refused** (``REFUSED``): settings that change the parameters' shapes or meaning, the
  optimizer's state or the objective (model, PEFT method and its options, quantization, freezing,
  pure bf16, the optimizer, ``--use_dpo``): the saved run cannot continue under them. The error names the setting and both
  values.
* **remapped** (``LAYOUT``: batch size, ranks, seed, accumulation): the data position is counted
  in samples. Mid-epoch, the samples the checkpoint's layout had trained are worked out exactly
  (``GlobalBatchSampler.trained_samples``) and the rest of the epoch trains every other sample
  once, in the new layout; accumulation only regroups micro-batches into steps.
* **data** (``DATA`` and the dataset's section): the rows themselves. Compared by fingerprint; at an
  epoch boundary new rows are used from the next epoch, mid-epoch a change is refused (which new
  rows were trained cannot be known), and a position past the end of the data is an error.
* **applied** (everything else: lr, weight decay, schedule, clipping, epochs, step limits, saving,
  evaluation, logging, outputs): in effect from the first resumed step. The lr and weight decay
  replace the restored optimizer's values (``hyper``), and the lr schedule is rebuilt over the
  run's remaining steps in the new layout (``resumed_epoch``, ``total_steps``).

The config the resumed run records in its own checkpoints is the one in effect: the new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config.configs import DATASET_CONFIGS
from ..config.errors import ShardtuneError
from ..data.sampler import GlobalBatchSampler

# Changing these changes the parameters (shapes, meaning), the optimizer state or the objective
# (--use_dpo: a preference run's loss, metrics and reference model): never continued.
REFUSED = {
    "train_config": {"model_name", "use_peft", "peft_method", "quantization", "freeze_layers", "num_freeze_layers",
                     "freeze_LLM_only", "freeze_vision_tower", "use_dpo"},
    "fsdp_config": {"pure_bf16", "optimizer"},
    "lora_config": {"r", "lora_alpha", "target_modules", "modules_to_save", "use_rslora", "use_dora", "bias",
                    "task_type", "inference_mode"},
    "llama_adapter_config": {"adapter_len", "adapter_layers", "task_type"},
    "quantization_config": {"quant_type", "compute_dtype", "use_double_quant", "quant_storage"},
}
# How the rows are batched: the data position is remapped by samples.
LAYOUT = {"batch_size_training", "seed", "gradient_accumulation_steps"}
# What the rows are (with every field of the dataset's own section): compared by fingerprint.
DATA = {"dataset", "tokenizer_name", "batching_strategy", "context_length", "overlong", "skip_bad_rows",
        "eval_fraction"}
# Always differ between a run and its resume.
_IGNORED = {"resume", "resume_from"}


@dataclass
class DataRecord:
    """How a checkpoint's data position is counted: which rows, batched how."""

    rows: int
    fingerprint: str
    global_batch: int
    seed: int

    @classmethod
    def of(cls, sampler: GlobalBatchSampler, fingerprint: str) -> "DataRecord":
        return cls(rows=len(sampler.lengths), fingerprint=fingerprint, global_batch=sampler.global_batch_size,
                   seed=sampler.seed)


@dataclass
class ResumePlan:
    lines: list[str]
    epoch: int
    start_batch: int  # global batches of the new layout already done in ``epoch``
    skip: tuple[int, ...]  # samples of ``epoch`` trained under an earlier layout
    resumed_epoch: tuple[int, int]  # (epoch, the step at which it ends): the lr schedule's epochs
    total_steps: int  # of the whole run, for the lr schedule
    hyper: dict = field(default_factory=dict)  # optimizer values replacing the restored ones


def _flag(section: str, name: str) -> str:
    return f"--{name}" if section == "train_config" else f"--{section}.{name}"


def _changes(saved: dict, current: dict) -> list[tuple[str, str, Any, Any]]:
    """(section, field, old, new) for every field that differs; a section only one side has (the
    dataset's, when --dataset changed) is compared field by field against nothing."""
    out = []
    for section in sorted((set(saved) | set(current)) - {"versions"}):  # versions: the writer's, not a setting
        old, new = saved.get(section), current.get(section)
        if not isinstance(old, dict) and not isinstance(new, dict):
            continue
        if section in DATASET_CONFIGS and (old is None or new is None):
            continue  # the --dataset change itself says it
        old, new = old or {}, new or {}
        for name in sorted(set(old) | set(new)):
            if section == "train_config" and name in _IGNORED:
                continue
            if old.get(name) != new.get(name):
                out.append((section, name, old.get(name), new.get(name)))
    return out


def _section_in_use(section: str, train: dict) -> bool:
    if section == "lora_config":
        return bool(train.get("use_peft")) and train.get("peft_method") == "lora"
    if section == "llama_adapter_config":
        return bool(train.get("use_peft")) and train.get("peft_method") == "llama_adapter"
    if section == "quantization_config":
        return bool(train.get("quantization"))
    return True


def read_saved_config(path: Path) -> Optional[dict]:
    from .sharded import TRAIN_PARAMS

    try:
        data = yaml.safe_load((path / TRAIN_PARAMS).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def plan_resume(path: Path, state: dict, *, config: dict, world_size: int, sampler: GlobalBatchSampler,
                data: DataRecord, steps_per_epoch: int, num_epochs: int, max_train_step: int) -> ResumePlan:
    """Decide what resuming ``path`` (its ``train_state.json`` is ``state``) means under ``config``;
    raises :class:`ShardtuneError` for what cannot be continued. ``steps_per_epoch``: of a whole epoch
    in this run's layout. Leaves ``sampler`` set to the resumed epoch."""
    saved = read_saved_config(path)
    lines: list[str] = []
    pos = state.get("position", {})
    epoch, batch, step = int(pos.get("epoch", 0)), int(pos.get("batch", 0)), int(pos.get("step", 0))
    trained = tuple(pos.get("trained", ()))
    train = config["train_config"]
    if saved is None:
        lines.append(f"resume: {path} has no readable train_params.yaml: its settings cannot be compared "
                     "with this run's, which are used as given")
        saved = config
    changes = _changes(saved, config)
    saved_train = saved.get("train_config", {})

    refused = [(s, n, o, v) for s, n, o, v in changes if n in REFUSED.get(s, ()) and _section_in_use(s, train)]
    if refused:
        what = "; ".join(f"{_flag(s, n)} is {o!r} in the checkpoint and {v!r} now" for s, n, o, v in refused)
        raise ShardtuneError(
            f"Cannot resume from {path}: {what}. This changes the model's parameters (their shapes or "
            "meaning), the optimizer's state or the training objective, so the saved run cannot continue "
            "under it (to preference-tune a fine-tuned model, start a new run from its exported model). Resume "
            "with the checkpoint's value (its train_params.yaml lists every setting), or start a new run "
            "(another --output_dir or --dist_checkpoint_folder) with the new one.")

    old_ranks = int(state.get("world_size") or world_size)
    saved_data = pos.get("data") if isinstance(pos.get("data"), dict) else None
    data_changes = [(s, n, o, v) for s, n, o, v in changes if (s == "train_config" and n in DATA)
                    or s in DATASET_CONFIGS]
    if saved_data is not None:
        old_batch, old_seed = int(saved_data["global_batch"]), int(saved_data["seed"])
        rows_changed = saved_data.get("fingerprint") != data.fingerprint
    else:  # a checkpoint from before the data record: the settings are all there is to compare
        old_batch = int(saved_train.get("batch_size_training", train["batch_size_training"])) * old_ranks
        old_seed = int(saved_train.get("seed", train["seed"]))
        rows_changed = bool(data_changes)
    mid_epoch = batch > 0 or bool(trained)
    where = f"epoch {epoch + 1}"

    if rows_changed and mid_epoch:
        settings = ", ".join(f"{_flag(s, n)} {o!r} -> {v!r}" for s, n, o, v in data_changes)
        before = f"{saved_data['rows']} rows then, {data.rows} now" if saved_data else ""
        what = (f"the training data changed ({settings})" if settings else
                f"the training data's content changed since the checkpoint ({before})")
        raise ShardtuneError(
            f"Cannot resume from {path}: {what}, and the checkpoint is in the middle of {where} "
            f"({batch} global batches trained), so which of the new rows were already trained cannot be "
            "known. Resume with the data and data settings it was trained with, resume from a checkpoint "
            "written at the end of an epoch, or start a new run.")

    old_sampler = sampler.with_layout(global_batch_size=old_batch, seed=old_seed)
    old_sampler.set_epoch(epoch, 0, trained)
    if batch > old_sampler.epoch_batches:
        raise ShardtuneError(
            f"Cannot resume from {path}: its data position ({batch} global batches of {old_batch} rows done in "
            f"{where}) is past the end of the training data, which makes {old_sampler.epoch_batches} such "
            f"batches ({data.rows} rows): the data must have changed since the checkpoint (a shorter file?). "
            "Resume with the data it was trained with, or start a new run.")

    new_batch, new_seed = sampler.global_batch_size, sampler.seed
    relayout = mid_epoch and (new_batch != old_batch or new_seed != old_seed)
    if relayout:
        skip = tuple(sorted(old_sampler.trained_samples(epoch, batch, trained)))
        start_batch = 0
    else:
        skip, start_batch = trained, batch
    sampler.set_epoch(epoch, start_batch, skip)
    remaining_batches = max(0, sampler.epoch_batches - start_batch)

    # one line per changed setting
    for s, n, o, v in changes:
        flag = f"{_flag(s, n)} {o!r} -> {v!r}"
        if s in REFUSED and not _section_in_use(s, train):
            lines.append(f"resume: {flag}: not used by this run")
        elif (s == "train_config" and n in DATA) or s in DATASET_CONFIGS:
            lines.append(f"resume: {flag}: " + (f"new training rows from {where} on (the checkpoint is at the "
                                                 "start of an epoch)" if rows_changed else
                                                 "the training rows are the same as the checkpoint's"))
        elif s == "train_config" and n == "gradient_accumulation_steps":
            lines.append(f"resume: {flag}: optimizer steps of {v} micro-batches from step {step + 1} on; "
                         "the data position is unchanged")
        elif s == "train_config" and n in LAYOUT:
            what = "global batches of that size" if n == "batch_size_training" else "this seed's sample order"
            lines.append(f"resume: {flag}: {what} from now on" + (
                f"; {where} goes on with the samples it has not trained yet (data position below)" if relayout
                else ""))
        elif s == "train_config" and n == "lr":
            lines.append(f"resume: {flag}: the new lr applies from step {step + 1} on (it replaces the "
                         "restored optimizer's and scales the schedule from there)")
        else:
            lines.append(f"resume: {flag}: applies from step {step + 1} on")
    if rows_changed and not mid_epoch and not data_changes:
        before = f" ({saved_data['rows']} rows then, {data.rows} now)" if saved_data else ""
        lines.append(f"resume: the training data's content changed since the checkpoint{before}: the new rows "
                     f"are used from {where} on (the checkpoint is at the start of an epoch)")
    if relayout:
        unused = len(sampler.lengths) - len(skip) - remaining_batches * new_batch
        lines.append(
            f"resume: data position: {len(skip)} samples of {where} were trained in global batches of "
            f"{old_batch} (seed {old_seed}); its other {len(sampler.lengths) - len(skip)} samples are trained "
            f"now in {remaining_batches} global batches of {new_batch} (seed {new_seed})"
            + (f"; {unused} fill no batch and are left out, like any epoch's last partial batch" if unused else ""))

    epoch_end = step + math.ceil(remaining_batches / int(train["gradient_accumulation_steps"]))
    total = epoch_end + steps_per_epoch * max(0, num_epochs - epoch - 1)
    if max_train_step > 0:
        total = min(total, max_train_step)
    return ResumePlan(lines=lines, epoch=epoch, start_batch=start_batch, skip=skip,
                      resumed_epoch=(epoch, epoch_end), total_steps=total,
                      hyper={"lr": float(train["lr"]), "weight_decay": float(train["weight_decay"])})
