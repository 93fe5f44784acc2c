"""Prints the planner's estimates next to the measurements its tests assert on, as the Markdown
tables of docs/benchmarks.md ("Planner: estimate vs measured").

    .venv/bin/python tests/plan/report_measured.py

1. per-rank parameter, gradient and optimizer-state bytes of a 2-rank gloo run (``shard_worker.py``,
   one torchrun launch) against ``shard_bytes``;
2. the activation peak of single-process CPU steps (``test_activations.measure_step``) against
   ``activation_bytes``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
WORKER = HERE / "shard_worker.py"
sys.path.insert(0, str(HERE))

from conftest import build_odd_llama  # noqa: E402
from test_activations import CASES, measure_step  # noqa: E402
from test_exact_shards import _cases  # noqa: E402

from shardtune.config import parse_args  # noqa: E402
from shardtune.plan.estimate import layout_for, shard_bytes  # noqa: E402
from shardtune.plan.shapes import build_shapes, model_config  # noqa: E402


def shards(root: Path) -> None:
    model, tied = build_odd_llama(root / "odd"), build_odd_llama(root / "odd-tied", tied=True)
    cases = _cases(str(model), str(tied))
    (root / "cases.json").write_text(json.dumps(cases))
    start = time.time()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                    str(WORKER), str(root / "cases.json"), str(root / "out.json")], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    measured = json.loads((root / "out.json").read_text())
    print(f"2 ranks, one torchrun launch, {time.time() - start:.0f} s\n")
    print("| case | rank | params B (est / measured) | grads B | optimizer B | equal |")
    print("|:--|--:|--:|--:|--:|:--|")
    for name, args in cases.items():
        cfg = parse_args(args).config
        shapes = build_shapes(model_config(cfg.train.model_name), cfg)
        layout = layout_for(cfg, 1, 2)
        for rank, real in enumerate(measured[name]):
            est = shard_bytes(shapes, layout, cfg.fsdp.optimizer, "cpu", rank)
            got = (real["params"], real["grads"], real["optimizer"])
            mine = (est.params, est.grads, est.optimizer)
            cells = " | ".join(f"{m:,} / {g:,}" for m, g in zip(mine, got))
            print(f"| {name} | {rank} | {cells} | {'yes' if mine == got else 'NO'} |")


def activations(root: Path) -> None:
    from shardtune.demo.tiny import build_tiny_llama

    model = build_tiny_llama(root / "act", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             intermediate_size=352, max_positions=512)
    print("\n| case | batching | activation checkpointing | measured MiB | estimated MiB | estimate / measured |")
    print("|:--|:--|:--|--:|--:|--:|")
    for name, (flags, batching) in CASES.items():
        for ac in (False, True):
            measured, planned = measure_step(model, flags, ac, batching)
            print(f"| {name} | {batching} | {'on' if ac else 'off'} | {measured / 2 ** 20:.2f} | "
                  f"{planned / 2 ** 20:.2f} | {planned / measured:.3f} |")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        shards(Path(tmp))
        activations(Path(tmp))
