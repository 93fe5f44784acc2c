"""One tiny training run with every metrics output on (metrics files, TensorBoard, W&B offline,
the FLOP counter), shared by the tests of those modules: the run costs seconds, the checks none."""

from __future__ import annotations

import importlib.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
WANDB_FIELDS = {"project": "shardtune-tests", "entity": "tester", "job_type": "finetune", "tags": "tiny,cpu",
                "group": "metrics", "notes": "offline run of the test suite", "mode": "offline"}


@dataclass
class LoggedRun:
    output: Path
    wandb_dir: Path
    results: dict
    printed: str

    @property
    def metrics(self) -> dict:
        return json.loads((self.output / "metrics.json").read_text())


def same_length_rows(n: int) -> list[dict]:
    """Rows that tokenize to one length, so padded batches hold no pads: the FLOP counter, which
    counts every slot, and the formula, which counts non-pad tokens, see the same work."""
    return [{"instruction": "Count to five.", "input": "", "output": "one two three four five"}] * n


@pytest.fixture(scope="session")
def logged_run(tiny_model_dir, tmp_path_factory) -> LoggedRun:
    import contextlib
    import io

    from shardtune.config import parse_args
    from shardtune.finetuning import setup, train
    from shardtune.parallel.distributed import init_distributed

    root = tmp_path_factory.mktemp("logged-run")
    data = root / "rows.json"
    data.write_text(json.dumps(same_length_rows(24)))
    args = ["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
            str(data), "--output_dir", str(root / "out"), "--device", "cpu", "--batching_strategy", "padding",
            "--batch_size_training", "4", "--context_length", "64", "--num_epochs", "2", "--lr", "1e-3",
            "--save_model", "False", "--save_metrics", "--flop_counter", "--flop_counter_start", "1",
            "--num_workers_dataloader", "0",
            # the formula counts the head on every position, as the plain loss runs it (the chunked
            # loss skips prompt positions and recomputes the head: ~12% fewer FLOPs on this tiny model)
            "--loss", "plain"]
    if HAS_TENSORBOARD:
        args += ["--use_tensorboard"]
    if HAS_WANDB:
        args += ["--use_wandb", *(a for k, v in WANDB_FIELDS.items() for a in (f"--wandb_config.{k}", v))]
    cfg = parse_args(args).config
    wandb_dir = root / "wandb"
    wandb_dir.mkdir()
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as env_vars, contextlib.redirect_stdout(printed):
        # W&B's own files (settings, caches) stay in the test's folder too; nothing goes online.
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env_vars.setenv(name, str(wandb_dir))
        env_vars.setenv("WANDB_SILENT", "true")
        env_vars.setenv("WANDB_CONSOLE", "off")
        env = init_distributed("cpu")
        results = train(cfg, env, setup(cfg, env))
    return LoggedRun(root / "out", wandb_dir, results, printed.getvalue())


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``): a LevelDB-style log of 32 KiB
    blocks after a 7-byte ``:W&B`` header, each chunk ``crc32 (4) | length (2) | type (1)`` (full,
    first, middle, last), each record a ``wandb_internal_pb2.Record``. wandb 0.30 ships no Python
    reader of its own (the Go core writes the file), so the test reads the format itself."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        piece = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(piece)
        elif kind == 2:
            pending = piece
        elif kind == 3:
            pending += piece
        elif kind == 4:
            out.append(pending + piece)
        else:
            break
    return [pb.Record.FromString(x) for x in out]


@pytest.fixture(scope="session")
def read_wandb_run():
    """``wandb_records`` for the tests (conftest helpers are reached through fixtures)."""
    return wandb_records
