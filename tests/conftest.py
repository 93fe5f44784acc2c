"""Shared fixtures: tiny models and tokenizers built locally, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep each test process to the machine's two cores and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests run only where a CUDA GPU is visible (scripts/device_check.sh)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/device_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-initialised 2-layer Llama (~160k params) + BPE tokenizer as an HF directory."""
    from shardtune.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """The same tiny Llama with tied input/output embeddings (no lm_head.weight in its files)."""
    from shardtune.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-tied-llama"), seed=0, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_vision_model_dir(tmp_path_factory) -> Path:
    """A random-initialised tiny Llama 3.2 Vision (Mllama, ~110k params) + its processor."""
    from shardtune.demo.tiny import build_tiny_mllama

    return build_tiny_mllama(tmp_path_factory.mktemp("tiny-vision"), seed=0)


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def write_colour_rows(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` the_cauldron-style rows (one PNG each, a block of colour on grey; the answer is the
    colour) as ``folder/data.jsonl`` with image paths relative to it."""
    import json
    import random

    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        image = Image.new("RGB", (rng.randint(24, 40), rng.randint(24, 40)), (128, 128, 128))
        image.paste(COLOURS[name], (4, 4, image.width - 4, image.height - 4))
        image.save(folder / "images" / f"{i}.png")
        rows.append({"images": [f"images/{i}.png"],
                     "texts": [{"user": "What colour is the block?", "assistant": name}]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def colour_rows(tmp_path_factory) -> Path:
    """40 image + question + answer rows for ``--dataset ocrvqa_dataset`` (a JSONL file)."""
    return write_colour_rows(tmp_path_factory.mktemp("colour-rows"), 40)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


FSDP_WORKER = Path(__file__).parent / "parallel" / "fsdp_worker.py"


@pytest.fixture(scope="session")
def run_fsdp_cases():
    """Run named recipe cases on 2 real gloo ranks in one torchrun launch (see fsdp_worker.py)."""
    import json
    import subprocess
    import sys

    def run(root: Path, cases: dict, timeout_s: int = 600) -> dict:
        (root / "cases.json").write_text(json.dumps(cases))
        out = root / "results.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(FSDP_WORKER), str(root / "cases.json"), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as exc:  # the worker's own watchdog should fire first
            def tail(b):
                return (b.decode(errors="replace") if isinstance(b, bytes) else (b or ""))[-6000:]

            pytest.fail(f"2-rank run timed out after {timeout_s} s\n{tail(exc.stdout)}\n{tail(exc.stderr)}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
        return json.loads(out.read_text())

    return run


@pytest.fixture(scope="session")
def ranks(tiny_model_dir, tmp_path_factory) -> Path:
    """shardtune full + LoRA checkpoints and llama-recipes FSDP1 checkpoints, written by 2 gloo ranks
    (tests/convert/make_checkpoints.py): what conversion and inference read."""
    import json
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("ranks")
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": f"Spell {i}.", "output": " ".join(str(i))} for i in range(24)]))
    script = Path(__file__).parent / "convert" / "make_checkpoints.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(root), str(tiny_model_dir), str(data)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and (root / "DONE").is_file(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size="3M", read_only=False) -> Path``: a real small (or read-only) file system
    mounted under ``tmp_path``, unmounted at teardown; the test is skipped where mounting is not
    permitted (not root, no CAP_SYS_ADMIN)."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: str = "3M", read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("cannot mount a tmpfs here: no mount command")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def pytest_sessionfinish(session, exitstatus):
    """Where SHARDTUNE_PYTEST_FINISHED names a file, write it when the run reaches its end.

    ``.ci/run`` checks for it: a test that ends the pytest process itself (``os._exit(0)``) leaves
    exit code 0 and no summary, which once made CI pass with a quarter of the suite not run.
    """
    marker = os.environ.get("SHARDTUNE_PYTEST_FINISHED")
    if marker:
        Path(marker).write_text(f"{session.testscollected} collected, exit status {int(exitstatus)}\n")
