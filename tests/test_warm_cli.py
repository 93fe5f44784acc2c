"""The suite's pre-imported ``python -m shardtune`` (tests/warm_cli, conftest's ``shardtune_cli``)
gives what a fresh interpreter gives: the same exit code, stdout and stderr, in the request's folder
and environment, from a process of its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys


def test_a_command_gives_what_a_fresh_interpreter_gives(shardtune_cli, tiny_model_dir, tmp_path):
    commands = [
        # exit 0; a relative path, read from the request's folder
        ["generate", str(tiny_model_dir), "--prompt_file", "prompts.txt", "--max_new_tokens", "4", "--device", "cpu"],
        ["finetune", "--model_name", str(tiny_model_dir), "--output_dir", str(tmp_path / "no-such" / "x"),
         "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", "missing.json"],  # exit 2, one paragraph
    ]
    (tmp_path / "prompts.txt").write_text("a b c\nhi\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in commands:
        warm = shardtune_cli(args, env=env, cwd=tmp_path)
        fresh = subprocess.run([sys.executable, "-m", "shardtune", *args], capture_output=True, text=True,
                               env=env, cwd=tmp_path, timeout=300)
        assert (warm.returncode, warm.stdout) == (fresh.returncode, fresh.stdout), args
        assert _untimed(warm.stderr) == _untimed(fresh.stderr), args


def _untimed(text: str) -> str:
    return re.sub(r"[\d.]+it/s", "", text)  # transformers' weight-loading bar reports its speed


def test_a_command_runs_in_its_own_process_with_the_requests_environment(shardtune_cli, tiny_model_dir, tmp_path):
    """A custom dataset file's code runs in the command's process: it reports that process."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, sys\n"
        "def get_custom_dataset(dataset_config, tokenizer, split):\n"
        "    json.dump({'pid': os.getpid(), 'cwd': os.getcwd(), 'probe': os.environ.get('PROBE'),\n"
        "               'argv0': sys.argv[0], 'main': sys.modules['__main__'].__spec__.name},\n"
        "              open(os.environ['PROBE'], 'w'))\n"
        "    raise SystemExit(7)\n")
    env = {**os.environ, "PROBE": str(tmp_path / "seen.json")}
    proc = shardtune_cli(["data", "--dataset", "custom_dataset", "--custom_dataset.file", str(probe),
                          "--model_name", str(tiny_model_dir)], env=env, cwd=tmp_path)
    seen = json.loads((tmp_path / "seen.json").read_text()) if (tmp_path / "seen.json").exists() else None
    assert seen is not None, proc.stderr[-3000:]
    assert proc.returncode == 7 and seen["pid"] != os.getpid()
    assert seen["cwd"] == str(tmp_path.resolve()) and seen["probe"] == env["PROBE"]
    assert seen["main"] == "shardtune.__main__" and seen["argv0"].endswith(os.path.join("shardtune", "__main__.py"))
