"""Resumable sharded checkpoints with torch.distributed.checkpoint (DCP).

Each rank writes its own shard of the model and optimizer (``__<rank>_0.distcp``, plus the
coordinator's ``.metadata``); the same code saves a plain single-process model. Alongside:
``train_state.json`` (data position, scheduler, model fingerprint, versions),
``train_params.yaml`` (the resolved config, human-readable) and ``rng-rank<r>.pt``.
DCP reshards on load, so a checkpoint from W ranks loads on any other number of ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config.errors import SameOnEveryRank, ShardtuneError
from ..notes import note
from ..outputs.digests import DamagedFiles, balanced_shares, digest_files, files_of, problems_of
from ..parallel.distributed import DistEnv
from . import layout
from .layout import TRAIN_STATE, read_train_state
from .space import disk_full, is_out_of_space, tensor_bytes
from .trainable import has_frozen, model_state

TRAIN_PARAMS = "train_params.yaml"
_FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "intermediate_size")


def model_fingerprint(model: torch.nn.Module) -> dict:
    """What must match for a checkpoint to load into ``model``: config sizes and parameter names."""
    config = getattr(model, "config", None)
    base = getattr(model, "get_base_model", None)
    if base is not None:
        config = base().config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    fp = {k: getattr(text_config, k, getattr(config, k, None)) for k in _FINGERPRINT_KEYS}
    fp["model_type"] = getattr(config, "model_type", None)
    names = sorted(n for n, _ in model.named_parameters())
    fp["num_parameter_tensors"] = len(names)
    fp["parameter_names_sha1"] = hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]
    return fp


def _versions() -> dict:
    import transformers

    from .. import __version__

    return {"shardtune": __version__, "torch": str(torch.__version__),
            "transformers": str(transformers.__version__)}


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _options(model: torch.nn.Module) -> StateDictOptions:
    # Frozen base weights (PEFT) are not saved: they come from --model_name on resume, so the
    # load is not strict about them (the fingerprint check guards against a different model).
    # model_state leaves out their tied aliases too (trainable.py).
    frozen = has_frozen(model)
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


@contextlib.contextmanager
def _single_process_is_meant():
    """DCP in a run without a process group (one process): torch warns that it "assumes the intent
    is to save/load in a single process" at every call, which is this run's intent. Only that
    warning is silenced (its exact category and message)."""
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=r"torch\.distributed is disabled, unavailable or uninitialized, "
                                            r"assuming the intent is to (save|load) in a single process")
        yield


def save_checkpoint(run: Path, step: int, *, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer], scheduler: Any, position: dict,
                    config_dict: dict, env: DistEnv) -> Optional[Path]:
    """Write ``run/step-N`` atomically from all ranks; returns its path on rank 0."""
    tmp, final = layout.temp_dir_for(run, step), run / layout.step_dir_name(step)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(env)
    options = _options(model)
    state = {"model": model_state(model, options)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    needed, failed = tensor_bytes(state), None
    try:
        with _single_process_is_meant():
            dcp.save(state, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank{env.rank}.pt")
        _injected_delay()
        if env.is_main:
            meta = {"step": step, "position": position, "scheduler": scheduler.state_dict(),
                    "has_optimizer": optimizer is not None, "world_size": env.world_size,
                    "fingerprint": model_fingerprint(model), "versions": _versions()}
            (tmp / TRAIN_STATE).write_text(json.dumps(meta, indent=2, default=str))
            (tmp / TRAIN_PARAMS).write_text(yaml.safe_dump({**config_dict, "versions": _versions()},
                                                          sort_keys=False))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        failed = exc
    # every rank's shard and RNG file is on disk, or some rank failed: all ranks learn which
    _settle_save(failed, tmp, step, needed, env)
    manifest = _digests(tmp, env)  # each rank hashes its share of the files
    failed = None
    if env.is_main:
        try:
            layout.commit(tmp, final, manifest)
        except OSError as exc:
            failed = exc
    _settle_save(failed, tmp, step, needed, env)
    return final if env.is_main else None


def _settle_save(failed: Optional[BaseException], tmp: Path, step: int, needed: int, env: DistEnv) -> None:
    """A collective every rank reaches after its part of a save: when any rank failed, the partial
    checkpoint is removed and every rank raises (none is left waiting in a barrier). A full disk
    is a :class:`ShardtuneError` that says so; another error is re-raised where it happened."""
    outcomes = _gather(env, None if failed is None else (is_out_of_space(failed), f"{type(failed).__name__}: {failed}"))
    failures = {rank: o for rank, o in enumerate(outcomes) if o is not None}
    if not failures:
        return
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # every rank is past its writes
    if any(space for space, _ in failures.values()):
        error = disk_full(tmp.parent, f"the checkpoint of step {step}", needed,
                          "The earlier checkpoints are untouched (`shardtune checkpoints "
                          f"{tmp.parent}` lists them; --resume continues from the newest).")
        raise SameOnEveryRank(str(error))  # every rank knows it; rank 0 (which freed the space) says it
    if failed is not None:
        raise failed
    rank, (_, text) = next(iter(failures.items()))
    raise RuntimeError(f"rank {rank} failed while saving the checkpoint of step {step}: {text.splitlines()[0]}")


def _injected_delay() -> None:
    """Crash-safety tests kill a run mid-save; this widens the window between writing the shards
    and publishing the checkpoint (``SHARDTUNE_TEST_SAVE_DELAY_S``, unset in normal use)."""
    delay = float(os.environ.get("SHARDTUNE_TEST_SAVE_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _gather(env: Optional[DistEnv], mine: object) -> list:
    if env is None or not env.distributed:
        return [mine]
    everyone: list = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def _digests(folder: Path, env: DistEnv) -> dict[str, dict]:
    """Size and SHA-256 of every file in ``folder``, the ranks hashing equal shares in parallel."""
    share = balanced_shares(folder, files_of(folder, skip=[layout.COMPLETE_MARKER]), env.world_size)[env.rank]
    merged: dict[str, dict] = {}
    for part in _gather(env, digest_files(folder, share)):
        merged.update(part)
    return merged


def earlier_checkpoint(path: Path) -> Optional[Path]:
    """The newest complete checkpoint of the same run older than ``path``."""
    step = layout.step_of(path)
    older = [p for p in layout.complete_checkpoints(path.parent) if step is not None and (layout.step_of(p) or 0) < step]
    return older[-1] if older else None


def verify_checkpoint(path: Path, env: Optional[DistEnv] = None, advice: Optional[str] = None) -> bool:
    """Check every file of a checkpoint against its ``COMPLETE`` marker (the ranks of ``env`` in
    parallel, or this process alone); a difference is a :class:`DamagedFiles` error naming the
    files. False only when the checkpoint has no digest record (no marker, or the ``ok`` an older
    shardtune wrote): nothing to check against. An unreadable marker is damage, not age."""
    try:
        manifest = layout.read_manifest(path)
    except DamagedFiles as exc:  # a marker that exists but is not a digest record: damaged, not old
        problems = exc.problems
    else:
        if manifest is None:
            return False
        ranks, rank = (env.world_size, env.rank) if env is not None else (1, 0)
        share = balanced_shares(path, sorted(manifest), ranks)[rank]
        problems = sorted(p for part in _gather(env, problems_of(path, manifest, share)) for p in part)
    if problems:
        if advice is None:
            earlier = earlier_checkpoint(path)
            advice = (f"It was not loaded. Resume from the earlier complete checkpoint with --resume_from {earlier}"
                      if earlier else "It was not loaded, and the run has no earlier checkpoint: start again "
                      "without --resume, or restore the files from a good copy.")
        raise DamagedFiles(path, problems, advice)
    return True


def verify_before_loading(path: Path, env: DistEnv) -> None:
    """:func:`verify_checkpoint` by every rank; a checkpoint without a digest record is loaded with a
    note that its files cannot be verified."""
    if not verify_checkpoint(path, env) and env.is_main:
        note(f"Checkpoint {path} was written before shardtune recorded file digests: its files "
             "cannot be verified.")


def check_compatible(saved: dict, model: torch.nn.Module, path: Path) -> None:
    """Refuse a checkpoint from another model or PEFT set-up, naming what differs."""
    current = model_fingerprint(model)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {current[k]!r}"
             for k in current if saved.get(k) != current[k]]
    if diffs:
        raise ShardtuneError(
            f"Checkpoint {path} was written for a different model or training set-up ("
            + "; ".join(diffs[:4]) + "). Resume with the --model_name and PEFT options it was "
            "trained with, or start a new run with another --dist_checkpoint_folder.")


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    scheduler: Any, env: DistEnv, hyper: Optional[dict] = None, verified: bool = False) -> dict:
    """Restore model, optimizer, scheduler and RNG from ``path`` (its files verified against their
    recorded digests first); returns the saved data position. ``hyper`` (``lr``, ``weight_decay``):
    this run's values, which replace the restored optimizer's and scheduler's. ``verified``: the
    caller has checked the digests already."""
    meta = read_train_state(path)
    if not verified:
        verify_before_loading(path, env)
    check_compatible(meta["fingerprint"], model, path)
    options = _options(model)
    state = {"model": model_state(model, options)}
    load_optim = optimizer is not None and meta.get("has_optimizer")
    if optimizer is not None and not load_optim and env.is_main:
        note(f"Checkpoint {path} holds no optimizer state (it was an epoch save point "
             "written without --save_optimizer): the optimizer starts afresh, so the "
             "resumed run is not an exact continuation.")
    if load_optim:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    _check_shapes(path, state)
    try:
        with _single_process_is_meant():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        # DCP wraps per-rank failures (truncated shard, missing key) in CheckpointException.
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ShardtuneError(
            f"Could not read checkpoint {path}: a shard is truncated, corrupt or missing ({first[:300]}). "
            "Its files were left untouched; resume from an earlier checkpoint (`shardtune checkpoints "
            f"{path.parent}` lists them) with --resume_from.") from None
    set_model_state_dict(model, state["model"], options=options)
    if load_optim:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    scheduler.load_state_dict(_with_hyper(meta["scheduler"], scheduler, optimizer, hyper))
    rng_file = path / f"rng-rank{env.rank}.pt"
    if meta.get("world_size") == env.world_size and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    elif env.is_main:
        note(f"Checkpoint {path} was written by {meta.get('world_size')} ranks and is "
             f"resumed on {env.world_size}: model and optimizer are resharded, the data position "
             "is counted in samples, and random streams (dropout) differ.")
    return meta["position"]


def _with_hyper(saved: dict, scheduler: Any, optimizer: Optional[torch.optim.Optimizer],
                hyper: Optional[dict]) -> dict:
    """The saved scheduler state with this run's lr as its base, and the optimizer's lr and weight
    decay set to match: restoring them unchanged would keep the checkpoint's values while the run
    records the new ones."""
    if not hyper:
        return saved
    state = dict(saved)
    lr = hyper["lr"]
    current = lr * scheduler.lr_lambdas[0](state["last_epoch"])  # the schedule's value at the resumed step
    state["base_lrs"] = [lr] * len(state["base_lrs"])
    state["_last_lr"] = [current] * len(state["base_lrs"])
    for group in optimizer.param_groups if optimizer is not None else ():
        group["lr"], group["initial_lr"] = current, lr
        if "weight_decay" in hyper and "weight_decay" in group:
            group["weight_decay"] = hyper["weight_decay"]
    return state


def _check_shapes(path: Path, state: dict) -> None:
    """Name a tensor whose shape differs between the checkpoint and this run (another LoRA rank or
    model size) instead of letting DCP report it as a damaged shard."""
    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception:  # an unreadable index is reported by the load itself
        return
    wrong = []
    for name, tensor in state["model"].items():
        meta = stored.get(f"model.{name}")
        size = getattr(meta, "size", None)
        if size is not None and isinstance(tensor, torch.Tensor) and tuple(size) != tuple(tensor.shape):
            wrong.append(f"{name} is {list(size)} in the checkpoint and {list(tensor.shape)} here")
    if wrong:
        raise ShardtuneError(
            f"Checkpoint {path} does not fit this run's model: {'; '.join(wrong[:3])}"
            f"{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''}. The checkpoint is intact; a setting "
            "that sets these shapes differs from the one it was trained with (the model, --lora_config.r or "
            "another adapter option: its train_params.yaml lists them). Resume with those settings, or start "
            "a new run.")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
