"""The recipe stays readable: short functions, in the order they run (caller before callee)."""

from __future__ import annotations

import ast
from pathlib import Path

import shardtune.finetuning as recipe

MAX_LINES = 60


def _functions() -> list[ast.FunctionDef]:
    tree = ast.parse(Path(recipe.__file__).read_text())
    return [node for node in tree.body if isinstance(node, ast.FunctionDef)]


def test_every_recipe_function_is_at_most_60_lines():
    lengths = {f.name: f.end_lineno - f.lineno + 1 for f in _functions()}
    longest = max(lengths, key=lengths.get)
    assert lengths["train"] <= MAX_LINES, f"train() is {lengths['train']} lines"
    assert lengths[longest] <= MAX_LINES, f"{longest}() is {lengths[longest]} lines"


def test_the_recipe_reads_top_to_bottom_caller_first():
    functions = _functions()
    assert functions[0].name == "main"  # the entry point opens the file
    line = {f.name: f.lineno for f in functions}
    first_caller: dict[str, int] = {}
    for f in functions:
        for node in ast.walk(f):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in line:
                callee = node.func.id
                if callee != f.name:
                    first_caller[callee] = min(first_caller.get(callee, f.lineno), f.lineno)
    # each function is defined below the first function that calls it: the file is read in the order it runs
    out_of_order = [name for name, caller in first_caller.items() if line[name] < caller]
    assert not out_of_order, f"defined above their first caller: {out_of_order}"
    assert set(first_caller) >= {"run", "run_held", "setup", "train", "setup_model", "attention_for"}
    # run refuses what cannot work (shardtune/preflight.py, light enough for the launcher) before run_held
    run = next(f for f in functions if f.name == "run")
    called = [node.func.id for node in ast.walk(run) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    assert called.index("check_run") < called.index("run_held"), called


def test_a_run_reads_the_model_config_and_chooses_attention_once(tiny_model_dir, tmp_path, monkeypatch):
    """Spies (the real functions run): the recipe passes what it computed along instead of redoing it."""
    import json

    calls = {"load_config": 0, "attention_for": 0}

    def counted(name: str, real):
        def spy(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return spy

    import shardtune.preflight as preflight

    for name in calls:
        monkeypatch.setattr(recipe, name, counted(name, getattr(recipe, name)))
    # the model's family is read once, by preflight (from config.json: light enough for the
    # launcher), and passed along: neither the recipe nor preflight reads the config again
    calls["local_family"] = 0
    monkeypatch.setattr(preflight, "local_family", counted("local_family", preflight.local_family))
    monkeypatch.setattr(preflight, "load_config", counted("load_config", preflight.load_config))
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 1)))}
            for i in range(16)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    results = recipe.main(["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset",
                           "--alpaca_dataset.data_path", str(tmp_path / "rows.json"), "--output_dir",
                           str(tmp_path / "out"), "--device", "cpu", "--batch_size_training", "4",
                           "--context_length", "64", "--max_train_step", "1", "--run_validation", "False",
                           "--save_model", "False"])
    assert results["steps"] == 1
    assert calls == {"load_config": 0, "attention_for": 1, "local_family": 1}
