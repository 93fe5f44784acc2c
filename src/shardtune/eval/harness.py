"""EleutherAI's lm-evaluation-harness (``pip install 'shardtune[eval]'``) on a model in memory.

The model ``load_for_inference`` loaded is wrapped in lm-eval's ``HFLM`` as it is (no copy on
disk) and evaluated with ``lm_eval.simple_evaluate``. Tasks come from lm-eval's own catalogue
(their data from the Hugging Face Hub, so they need a network) or from ``--include_path``
folders of task YAMLs, which can read local JSONL/CSV files and work offline.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config.errors import ShardtuneError

INSTALL_HINT = "pip install 'shardtune[eval]'"


def require_lm_eval() -> None:
    """Refuse, before any work, when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ShardtuneError(
            "--tasks runs EleutherAI's lm-evaluation-harness, which is not installed: "
            f"{INSTALL_HINT} (the official lm_eval package). Without it, `shardtune eval MODEL "
            "--dataset ...` runs the quick evaluation (loss, perplexity and exact match).")


def check_include_paths(paths: Sequence[str]) -> list[Path]:
    """Each ``--include_path`` must be a task YAML file or a folder holding some."""
    checked = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_file():
            if p.suffix not in (".yaml", ".yml"):
                raise ShardtuneError(f"--include_path {raw!r} is a file but not a task YAML (.yaml). Pass "
                                     "the folder of your task YAMLs, or one of them.")
        elif p.is_dir():
            if not any(p.rglob("*.yaml")) and not any(p.rglob("*.yml")):
                raise ShardtuneError(f"--include_path {raw!r} holds no task YAML (*.yaml) at any depth. Pass "
                                     "the folder of your task definitions (see examples/eval_tasks).")
        else:
            raise ShardtuneError(f"--include_path {raw!r} does not exist. Pass a folder of lm-eval task "
                                 "YAMLs (see examples/eval_tasks).")
        checked.append(p)
    return checked


def _build_manager(include: list[Path], with_builtins: bool):
    from lm_eval.tasks import TaskManager

    try:
        return TaskManager(include_path=[str(p) for p in include] or None, include_defaults=with_builtins)
    except Exception as exc:  # a malformed YAML in the user's folder: name it, no lm-eval traceback
        where = ", ".join(map(str, include)) or "lm-eval's task catalogue"
        raise ShardtuneError(f"lm-eval could not read the task definitions in {where}: "
                             f"{type(exc).__name__}: {exc}") from None


def _resolve(manager, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(task specs lm-eval loads, names it does not know): a registered name, a task YAML path,
    or a glob over registered names (``mmlu_*``)."""
    found, unknown = [], []
    for name in names:
        if name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            found.append(name)
            continue
        matched = manager.match_tasks([name]) if any(c in name for c in "*?[") else []
        if matched:
            found += [m for m in matched if m not in found]
        else:
            unknown.append(name)
    return found, unknown


def task_manager(names: Sequence[str], include: list[Path]) -> tuple[Any, list[str]]:
    """An lm-eval ``TaskManager`` that knows every name in ``names``, and the resolved task specs.

    The folders of ``include`` are indexed first on their own: indexing lm-eval's catalogue
    (thousands of YAMLs) takes ~10 s and is skipped when every task is local."""
    if include:
        manager = _build_manager(include, with_builtins=False)
        found, unknown = _resolve(manager, names)
        if not unknown:
            return manager, found
    manager = _build_manager(include, with_builtins=True)
    found, unknown = _resolve(manager, names)
    if unknown:
        close = [c for name in unknown for c in difflib.get_close_matches(name, manager.all_tasks, n=3)]
        hint = f" Close names: {', '.join(dict.fromkeys(close))}." if close else ""
        where = (f"in --include_path {', '.join(map(str, include))} or in lm-eval's catalogue"
                 if include else "in lm-eval's catalogue (local tasks need --include_path DIR)")
        raise ShardtuneError(f"Unknown lm-eval task {', '.join(map(repr, unknown))}: not found {where}.{hint} "
                             "`lm-eval ls tasks` lists the catalogue.")
    return manager, found


def run_tasks(model, tokenizer, tasks: Sequence[str], manager, *, num_fewshot: Optional[int] = None,
              limit: Optional[float] = None, batch_size: int = 8, log_samples: bool = False,
              apply_chat_template: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` on ``model`` (already in memory) through ``HFLM``; returns the
    harness's results dict (its ``samples`` only with ``log_samples``)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples,
                                      apply_chat_template=apply_chat_template)
    if results is None:  # only a non-zero rank gets None, and shardtune eval runs one process
        raise ShardtuneError("lm-eval returned no results.")
    return results


def json_ready(results: dict) -> dict:
    """The results with what JSON cannot hold (dtypes, functions, numpy scalars) made printable,
    as lm-eval's own writer does."""
    import json

    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))


def format_table(results: dict) -> str:
    """lm-eval's own table of the results (and of the groups, when there are any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
