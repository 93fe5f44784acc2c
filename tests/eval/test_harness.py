"""``shardtune eval --tasks``: EleutherAI's lm-evaluation-harness on the model in memory, offline on
the local example task, scoring exactly as the quick evaluation does on the same rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardtune.config import ShardtuneError
from shardtune.data.prompts import alpaca_prompt
from shardtune.eval.cli import main as eval_main

REPO = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO / "examples" / "eval_tasks"
TASK_ROWS = TASKS_DIR / "shardtune_demo" / "test.jsonl"

needs_lm_eval = pytest.mark.skipif(
    __import__("importlib").util.find_spec("lm_eval") is None,
    reason="lm_eval is not installed (pip install 'shardtune[eval]'; scripts/setup.sh installs it)")


def quick(model, out: Path, *extra: str) -> dict:
    """The quick evaluation of the example task's rows (the same file the task reads)."""
    return eval_main([str(model), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(TASK_ROWS),
                      "--split", "all", "--context_length", "256", "--output", str(out), "--log_samples", *extra])


def harness(model, out: Path, tasks: str, *extra: str) -> dict:
    return eval_main([str(model), "--tasks", tasks, "--include_path", str(TASKS_DIR), "--output", str(out),
                      "--log_samples", *extra])


def per_row(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=lambda s: s["doc_id"])


@needs_lm_eval
def test_lm_eval_on_the_example_task_equals_the_quick_evaluation(trained_run, task_rows, tmp_path, capsys):
    """The harness and the quick evaluation see the same prompts, generate the same answers and
    score them the same: the accuracies are equal, row by row, on a model that gets some right."""
    lm = harness(trained_run.output, tmp_path / "lm.json", "shardtune_demo")
    printed = capsys.readouterr().out
    assert "shardtune_demo" in printed and "exact_match" in printed  # lm-eval's table
    q = quick(trained_run.output, tmp_path / "q.json")

    accuracy = lm["results"]["shardtune_demo"]["exact_match,none"]
    assert 0 < accuracy < 1
    assert accuracy == q["exact_match"]
    samples = per_row(lm["samples"]["shardtune_demo"])
    assert len(samples) == len(task_rows) == q["answered"] == 200
    for sample, row, answer in zip(samples, task_rows, q["answers"]):
        assert sample["arguments"][0][0] == alpaca_prompt(row)  # the same prompt
        assert sample["target"] == row["output"] == answer["reference"]
        assert sample["filtered_resps"] == [answer["answer"]]  # the same generated text
        assert sample["exact_match"] == float(answer["correct"])
    saved = json.loads((tmp_path / "lm.json").read_text())
    assert saved["written_by"] == "shardtune eval" and saved["kind"] == "lm_eval"
    assert saved["results"]["shardtune_demo"]["exact_match,none"] == accuracy


@needs_lm_eval
def test_an_adapter_dir_through_lm_eval_equals_its_quick_evaluation(adapter_dir, tmp_path):
    lm = harness(adapter_dir, tmp_path / "lm.json", "shardtune_demo", "--limit", "60")
    q = quick(adapter_dir, tmp_path / "q.json", "--limit", "60", "--max_new_tokens", "8")
    assert lm["results"]["shardtune_demo"]["exact_match,none"] == q["exact_match"]
    assert [s["filtered_resps"][0] for s in per_row(lm["samples"]["shardtune_demo"])] == \
        [a["answer"] for a in q["answers"]]


@needs_lm_eval
def test_a_step_checkpoint_is_evaluated_in_memory(trained_run, tmp_path):
    """The run's resumable checkpoint (DCP shards) holds the saved model's weights: lm-eval on it,
    read into memory without a converted copy, gives the HF output's quick-evaluation answers."""
    assert (trained_run.checkpoint / ".metadata").is_file()
    lm = harness(trained_run.checkpoint, tmp_path / "lm.json", "shardtune_demo", "--limit", "60")
    q = quick(trained_run.output, tmp_path / "q.json", "--limit", "60", "--max_new_tokens", "8")
    assert lm["results"]["shardtune_demo"]["exact_match,none"] == q["exact_match"]
    assert [s["filtered_resps"][0] for s in per_row(lm["samples"]["shardtune_demo"])] == \
        [a["answer"] for a in q["answers"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.json", "q.json"]  # nothing converted on disk


@needs_lm_eval
def test_a_task_yaml_over_a_local_jsonl_file_works_offline(trained_run, tmp_path, shardtune_cli):
    """A user's own task: ``dataset_path: json`` over a local file (no custom loader), with --limit."""
    text = (TASKS_DIR / "shardtune_demo" / "shardtune_demo.yaml").read_text()
    text = text.replace("task: shardtune_demo", "task: my_local_json_task")
    text = text.replace("custom_dataset: !function rows.load",
                        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {TASK_ROWS}")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_task.yaml").write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = shardtune_cli(["eval", str(trained_run.output), "--tasks", "my_local_json_task", "--include_path",
                          str(tasks), "--limit", "30", "--output", str(tmp_path / "lm.json")],
                         timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "my_local_json_task" in proc.stdout
    lm = json.loads((tmp_path / "lm.json").read_text())
    q = quick(trained_run.output, tmp_path / "q.json", "--limit", "30", "--max_new_tokens", "8")
    assert lm["results"]["my_local_json_task"]["exact_match,none"] == q["exact_match"]
    assert lm["n-samples"]["my_local_json_task"]["effective"] == 30


@needs_lm_eval
def test_an_unknown_task_names_the_close_ones_before_the_model_loads(tmp_path):
    # MODEL is a folder without a model: the error comes from the task name, before any loading
    (tmp_path / "model").mkdir()
    with pytest.raises(ShardtuneError, match=r"Unknown lm-eval task 'shardtune_dem'.*shardtune_demo"):
        eval_main([str(tmp_path / "model"), "--tasks", "shardtune_dem", "--include_path", str(TASKS_DIR),
                   "--output", str(tmp_path / "r.json")])


@needs_lm_eval
@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "holds no task YAML"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "not a task YAML"),
])
def test_a_bad_include_path_is_refused(tiny_model_dir, tmp_path, make, message):
    with pytest.raises(ShardtuneError, match=message):
        eval_main([str(tiny_model_dir), "--tasks", "shardtune_demo", "--include_path", str(make(tmp_path)),
                   "--output", str(tmp_path / "r.json")])


@needs_lm_eval
def test_a_vision_model_is_refused_with_the_reason(tiny_vision_model_dir, tmp_path):
    with pytest.raises(ShardtuneError, match="is a vision model"):
        eval_main([str(tiny_vision_model_dir), "--tasks", "shardtune_demo", "--include_path", str(TASKS_DIR),
                   "--output", str(tmp_path / "r.json")])


def test_without_lm_eval_the_error_says_what_to_install(tiny_model_dir, tmp_path):
    """Run where lm_eval cannot be imported (the import system is told it is absent)."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"  # import lm_eval now fails, as when not installed
            "from shardtune.cli import main\n"
            f"main(['eval', {str(tiny_model_dir)!r}, '--tasks', 'shardtune_demo', '--output', "
            f"{str(tmp_path / 'r.json')!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'shardtune[eval]'" in proc.stderr and "Traceback" not in proc.stderr
