"""What a fine-tuning run refuses before any work starts, and the hold on its output folder.

Used by the recipe (``finetuning.run``, in each rank) and by ``shardtune finetune``'s launcher
before it starts ranks. Kept light on purpose: it checks paths, configs, data sources and output
folders, and imports neither transformers' models nor peft nor bitsandbytes, so the launcher and a
refused run (most bad inputs end here) do not pay the ~7 s CPU of the recipe's imports.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

from .checkpoint.layout import checkpoint_run_dir, resume_point, writes_resumable_checkpoints
from .config import Config
from .data import check_data_source
from .family_checks import refuse_for_family
from .model.family import FAMILIES, ModelFamily, family_for_config, family_for_type
from .model.loading import check_model_source, check_tokenizer_source, check_weight_files, load_config
from .output_lock import hold_unless_launcher_does, inherit_from_launcher
from .outputs.ownership import check_not_an_input, check_output_dir, check_writable, remove_stale_temps, top_entry_under
from .parallel.distributed import check_world_size
from .train.tensorboard_log import check_tensorboard_dir, tensorboard_dir


# What a process's preflight found: the --output_dir entries that --overwrite_output_dir lets the
# run write beside, and the local model's family (None: a hub id, read once ranks start).
Checked = tuple[list[str], Optional[ModelFamily]]


def check_run(cfg: Config) -> Checked:
    """:func:`preflight` in this process (a rank, or a single process): torchrun's WORLD_SIZE ranks."""
    family = local_family(cfg.train.model_name)  # the model's config, read once in this process
    return preflight(cfg, int(os.environ.get("WORLD_SIZE", 1)), family), family


def local_family(model_name: str) -> Optional[ModelFamily]:
    """The family of a local model folder; None for a hub id (its config is read once ranks start).

    The ``model_type`` of config.json names it; only a config that names no family we know
    (unreadable, not JSON, another model type) goes through AutoConfig, whose refusal says why.
    AutoConfig itself reads the config when the model is loaded (``load_inputs``)."""
    path = Path(model_name) / "config.json"
    if not path.is_file():
        return None
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if any(model_type in family.model_types for family in FAMILIES):
        return family_for_type(model_type)
    return family_for_config(load_config(model_name))


def preflight(cfg: Config, world_size: int, family: Optional[ModelFamily] = None) -> list[str]:
    """Everything that can be refused before any work starts (and before ranks are launched):
    the model path, the data source, the world size, and the output directory. Returns the
    files of --output_dir that --overwrite_output_dir lets the run write beside."""
    t = cfg.train
    check_model_source(t.model_name)
    check_weight_files(t.model_name)  # a truncated copy: refused here, not by each rank's load
    family = family or local_family(t.model_name)
    if family is not None:
        refuse_for_family(cfg, family)
    if t.tokenizer_name:
        check_tokenizer_source(t.tokenizer_name, "--tokenizer_name")
    check_data_source(cfg)
    if t.resume_from:
        resume_point(t.resume_from)
    check_world_size(t.enable_fsdp, world_size)
    board = tensorboard_dir(t.output_dir, t.tensorboard_dir) if t.use_tensorboard else None
    if board is not None:
        check_tensorboard_dir(board, {"--model_name": t.model_name, "--tokenizer_name": t.tokenizer_name,
                                      "--from_peft_checkpoint": t.from_peft_checkpoint}, t.output_dir)
    ckpt = checkpoint_run_dir(cfg)
    whole = [entry for entry in (top_entry_under(t.output_dir, ckpt),
                                 "merged/" if t.merge_lora else None,
                                 top_entry_under(t.output_dir, board) if board is not None else None) if entry]
    inputs = {"--model_name": t.model_name, "--tokenizer_name": t.tokenizer_name,
              "--from_peft_checkpoint": t.from_peft_checkpoint}
    foreign = check_output_dir(t.output_dir, flag="--output_dir", overwrite=t.overwrite_output_dir,
                               overwrite_flag="--overwrite_output_dir", replaced_whole=whole, protected=inputs)
    check_writable(t.output_dir, "--output_dir")
    if writes_resumable_checkpoints(cfg) and not top_entry_under(t.output_dir, ckpt):  # elsewhere
        check_not_an_input(ckpt, "--dist_checkpoint_root_folder", inputs)
        check_writable(ckpt, "--dist_checkpoint_root_folder")
    if board is not None:
        check_writable(board, "--tensorboard_dir")
    return foreign


@contextlib.contextmanager
def hold_outputs(cfg: Config, launcher: bool = False) -> Iterator[None]:
    """One run per --output_dir: the launcher (``launcher``: it tells its ranks), a single process,
    or rank 0 of a bare torchrun launch locks it for the run's life, and removes what an
    interrupted earlier save left there (no other run can be writing it now)."""
    lock = None
    if int(os.environ.get("RANK", 0)) == 0:
        lock = hold_unless_launcher_does(cfg.train.output_dir)
        if lock is not None:
            remove_stale_temps(cfg.train.output_dir)
            if launcher:
                lock.export_to_children()
        else:  # a launcher killed alone leaves this run writing the folder: rank 0 holds it then
            lock = inherit_from_launcher(cfg.train.output_dir)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
