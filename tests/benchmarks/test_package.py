"""benchmarks/ is a package run from the repository root: no ``sys.path`` edits, every declared
scenario names a benchmark module with a ``main``, the runner lists them, and a smoke scenario
runs end to end through the runner (the torchrun ranks start as ``-m benchmarks.throughput``).

Every other ``<name>.smoke`` scenario runs with SHARDTUNE_BENCH_SMOKE=all (each starts fresh
processes: ~1 minute apiece here; the peers' own smoke test is tests/benchmarks/test_peers_smoke.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


def _scenarios() -> list[tuple[str, str]]:
    """(name, module) of every declared scenario, read from the file (pytest does not import
    the repository root's packages)."""
    path = BENCHMARKS / "scenarios.py"
    text = path.read_text() if path.is_file() else ""
    return re.findall(r'_s\("([\w.]+)", "(\w+)"', text)


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_no_benchmark_edits_sys_path():
    offenders = [f"{path.relative_to(REPO)}:{i}" for path in sorted(BENCHMARKS.rglob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"sys\.path\.(insert|append)|sys\.path\s*\[.*\]\s*=|sys\.path\s*\+=", line)]
    assert offenders == []
    packages = [p.parent for p in BENCHMARKS.rglob("*.py") if "__pycache__" not in p.parts]
    assert all((folder / "__init__.py").is_file() for folder in packages)


def test_every_scenario_names_a_benchmark_with_a_main_and_each_has_a_smoke_run():
    scenarios = _scenarios()
    assert len(scenarios) >= 20
    modules = {module for _, module in scenarios}
    for module in modules:
        assert re.search(r"^def main\(argv", (BENCHMARKS / f"{module}.py").read_text(), re.M), module
    benchmarks = {p.stem for p in BENCHMARKS.glob("*.py")} - {"__init__", "__main__", "common", "scenarios"}
    assert modules == benchmarks  # every benchmark is declared
    assert {f"{m}.smoke" for m in benchmarks} <= {name for name, _ in scenarios}


def test_the_runner_lists_every_scenario_with_its_command():
    proc = _run("list", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name, module in _scenarios():
        assert re.search(rf"^{re.escape(name)}\s", proc.stdout, re.M), name
        assert f"python -m benchmarks.{module}" in proc.stdout
    bad = _run("run", "no_such_scenario", timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.slow
def test_throughput_smoke_runs_through_the_runner(tmp_path):
    out = tmp_path / "throughput.json"
    proc = _run("run", "throughput.smoke", "--workdir", str(tmp_path / "work"), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert (row["ranks"], row["strategy"], row["compile"], row["timed_steps"]) == (1, "packing", False, 1)
    assert row["nonpad_tokens"] > 0 and row["model_flops"] > 0 and 0 < row["attention_share"] < 1
    assert row["gemm_peak_sum"] > 0 and row["mfu"] > 0 and len(row["losses"]) == 2
    assert len(row["recipe_mfu"]) == 1  # the recipe's own live MFU of the timed step
    assert "| ranks | threads/rank | batching |" in proc.stdout and "GEMM peak per rank" in proc.stdout


SMOKES = [name for name, _ in _scenarios() if name.endswith(".smoke") and name != "throughput.smoke"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SHARDTUNE_BENCH_SMOKE") != "all",
                    reason="every benchmark's smoke run: SHARDTUNE_BENCH_SMOKE=all")
@pytest.mark.parametrize("name", SMOKES)
def test_smoke_scenario(name, tmp_path):
    extra = [] if name.split(".")[0] in ("packed_attention", "packing_waste", "demo_tuning") else [
        "--out" if name.startswith("peers") else "--work" if name.startswith("convert") else "--workdir",
        str(tmp_path / ("out.json" if name.startswith("peers") else "work"))]
    if name.startswith("peers"):
        extra += ["--workdir", str(tmp_path / "work")]
    proc = _run("run", name, *extra, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
