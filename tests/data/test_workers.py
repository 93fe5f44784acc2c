"""DataLoader worker processes: started by the fork server (never forked from a rank), kept for
the run, gone with the training process, and skipped with a warning when data cannot be sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
import warnings

import psutil
import pytest
import torch

from shardtune.data import build_dataloader
from shardtune.data.custom import MODULE_PREFIX
from shardtune.data.workers import stop_workers, worker_options


def _samples(n: int = 24) -> list[dict]:
    return [{"input_ids": list(range(1, 3 + i % 7)), "labels": list(range(1, 3 + i % 7))} for i in range(n)]


def _loader(tokenizer, workers: int):
    return build_dataloader(_samples(), tokenizer=tokenizer, strategy="padding", batch_size=4,
                            context_length=64, shuffle=True, seed=1, num_workers=workers)


def _epochs(loader, n: int = 2) -> list[list[torch.Tensor]]:
    out = []
    for epoch in range(n):
        loader.batch_sampler.set_epoch(epoch)
        out.append([b["input_ids"] for b in loader])
    return out


def test_workers_come_from_the_fork_server_and_give_the_same_batches(tiny_tokenizer):
    loader = _loader(tiny_tokenizer, 1)
    assert loader.multiprocessing_context.get_start_method() == "forkserver" and loader.persistent_workers
    with_workers, in_process = _epochs(loader), _epochs(_loader(tiny_tokenizer, 0))
    for a, b in zip(with_workers, in_process):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    worker = psutil.Process(loader._iterator._workers[0].pid)  # private, but the only handle on it
    assert worker.ppid() != psutil.Process().pid  # not a fork of this (threaded) process


def test_stop_workers_ends_a_pool_kept_by_a_reference_cycle_at_once(tiny_tokenizer):
    """A loader that only the cycle collector frees waits 5 s per worker (its "stop" is queued
    after multiprocessing closed the queue), at the end of every run whose rank 0 kept one in a
    cycle (22 s of a 10 s 2-rank run); stopped first, its 2 workers exit at once."""
    import gc

    loaders = [_loader(tiny_tokenizer, 1), _loader(tiny_tokenizer, 1)]
    for loader in loaders:
        next(iter(loader))  # the persistent pool is started
    workers = [psutil.Process(w.pid) for loader in loaders for w in loader._iterator._workers]
    index_queues = [q for loader in loaders for q in loader._iterator._index_queues]
    cycle = {"loaders": loaders}
    cycle["self"] = cycle
    start = time.monotonic()
    stop_workers(*loaders, None)
    # each queue's feeder thread, holding two named semaphores, has ended: a process that exits now
    # (os._exit) leaves the resource tracker nothing to report
    assert not any(q._thread is not None and q._thread.is_alive() for q in index_queues)
    del loaders, loader, cycle
    gc.collect()
    assert time.monotonic() - start < 4.0  # without it: 2 workers x 5 s in the collector
    assert all(not w.is_running() or w.status() == psutil.STATUS_ZOMBIE for w in workers)


# A process with one loader whose single worker is running (the tokenizer folder is argv[1]).
_POOL_PRELUDE = """
import json, os, sys
from transformers import AutoTokenizer
from shardtune.data import build_dataloader
tok = AutoTokenizer.from_pretrained(sys.argv[1])
rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 8
loader = build_dataloader(rows, tokenizer=tok, strategy="padding", batch_size=2, context_length=16,
                          shuffle=False, seed=0, num_workers=1)
next(iter(loader))
"""

_ORPHAN_SCRIPT = _POOL_PRELUDE + """
print(json.dumps([w.pid for w in loader._iterator._workers]), flush=True)
os._exit(0)  # as a rank ends (end_process): no DataLoader clean-up runs
"""


def test_workers_exit_when_the_training_process_is_gone(tiny_model_dir):
    # The launcher reads the process's output to EOF: a worker left alive would hold the pipe open.
    proc = subprocess.run([sys.executable, "-c", _ORPHAN_SCRIPT, str(tiny_model_dir)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pids = json.loads(proc.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 15
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, f"workers {pids} outlived the training process"
        time.sleep(0.2)


_CYCLE_SCRIPT = _POOL_PRELUDE + """
from shardtune.parallel.distributed import end_process
cycle = {"loader": loader}
cycle["self"] = cycle  # as the recipe's frames once held rank 0's loaders to its end
del loader, cycle
end_process(0)  # how a rank ends: os._exit skips multiprocessing's exit hooks
"""


def test_a_process_ending_through_the_exit_helper_leaks_no_worker_semaphores(tiny_model_dir):
    """A loader kept alive to the end by a reference cycle still frees its worker pool's named
    semaphores: the resource tracker prints no "leaked semaphore objects" warning (issue 22: a
    bare torchrun 2-rank run printed it at every exit)."""
    proc = subprocess.run([sys.executable, "-c", _CYCLE_SCRIPT, str(tiny_model_dir)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leaked" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-2000:]


class _Collate:
    def __call__(self, rows):
        return rows


def test_data_that_cannot_reach_a_worker_is_loaded_in_process_with_a_note(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain note, not a Python warning
        assert worker_options(2, [{"a": 1}], lambda rows: rows) == {"num_workers": 0}
    assert capsys.readouterr().err.startswith("note: --num_workers_dataloader 2: the data collator cannot be sent")
    custom = types.ModuleType(f"{MODULE_PREFIX}mine_0000")  # a custom dataset file's module
    custom_collate = type("Collator", (_Collate,), {"__module__": custom.__name__})
    custom.Collator = custom_collate
    monkeypatch.setitem(sys.modules, custom.__name__, custom)
    assert worker_options(1, [{"a": 1}], custom_collate()) == {"num_workers": 0}
    assert "defined in the custom dataset file" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # the other ranks stay quiet
    assert worker_options(1, [{"a": 1}], custom_collate()) == {"num_workers": 0}
    assert capsys.readouterr().err == ""
    assert worker_options(0, [{"a": 1}], None) == {"num_workers": 0}
    assert worker_options(1, [{"a": 1}], _Collate())["persistent_workers"]


_BROKEN_RANK_SCRIPT = """
import subprocess, sys, threading, time
from shardtune.data.workers import exit_with_parent
import psutil
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
exit_with_parent(rank.pid, psutil.Process(rank.pid).create_time(), 0)
if sys.argv[1] in ("killed", "sharer"):
    rank.kill(); rank.wait()  # the rank is gone (kill -9) while a thread serves it
    error = ConnectionResetError(104, "Connection reset by peer")
else:
    error = ValueError("a real bug in a worker thread")
def serve():
    if sys.argv[1] != "sharer":
        raise error
    try:  # multiprocessing.resource_sharer's _serve loop reports its errors this way
        raise error
    except BaseException:
        sys.excepthook(*sys.exc_info())
thread = threading.Thread(target=serve); thread.start(); thread.join()
rank.kill()
time.sleep(3)  # the parent watcher ends the worker
"""


@pytest.mark.parametrize("case", ["killed", "sharer", "bug"])
def test_a_worker_thread_cut_off_by_its_killed_rank_ends_quietly(case):
    """A rank killed while a worker's resource_sharer thread hands it a batch's file descriptors
    resets that connection; the worker ends without a traceback in the job's output. A thread's
    other errors are still printed."""
    out = subprocess.run([sys.executable, "-c", _BROKEN_RANK_SCRIPT, case], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if case in ("killed", "sharer"):
        assert "Traceback" not in out.stderr, out.stderr
    else:
        assert "ValueError: a real bug in a worker thread" in out.stderr


# The built-in padding collator, also writing down the modules loaded in the worker that runs it.
_PROBE_COLLATOR = """
import sys
from shardtune.data.collate import PaddingCollator


class ModulesSeen(PaddingCollator):
    def __init__(self, pad_id, path):
        super().__init__(pad_id)
        self.path = path

    def __call__(self, rows):
        with open(self.path, "w") as f:
            f.write("\\n".join(sorted(sys.modules)))
        return super().__call__(rows)
"""

_WORKER_MODULES_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[1])
import shardtune.model.peft  # a rank has loaded the recipe: transformers, peft, bitsandbytes
from transformers import AutoTokenizer
from probe_collate import ModulesSeen
from shardtune.data import build_dataloader
rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 8
loader = build_dataloader(rows, tokenizer=AutoTokenizer.from_pretrained(sys.argv[2]), strategy="padding", batch_size=2, context_length=16, shuffle=False,
                          seed=0, num_workers=1, collate_fn=ModulesSeen(0, os.path.join(sys.argv[1], "seen.txt")))
assert loader.num_workers == 1, loader.num_workers
next(iter(loader))
os._exit(0)
"""


def test_a_worker_loads_what_its_data_needs_not_the_recipe(tmp_path, tiny_model_dir):
    """A DataLoader worker (and the fork server it comes from) imports torch, shardtune.data and
    what unpickling its rows and collator needs, not the transformers / peft / bitsandbytes that
    its rank loaded (~7 s CPU per rank, data/workers.py _preload)."""
    (tmp_path / "probe_collate.py").write_text(_PROBE_COLLATOR)
    # run as a package's __main__, as the ranks of `shardtune finetune` run (-m shardtune finetune);
    # a main module run by path or by another name keeps the full preload (see _preload)
    (tmp_path / "probe_main").mkdir()
    (tmp_path / "probe_main" / "__main__.py").write_text(_WORKER_MODULES_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "probe_main", str(tmp_path), str(tiny_model_dir)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = set((tmp_path / "seen.txt").read_text().split())
    assert {"torch", "shardtune.data.collate", "shardtune.data.workers", "probe_collate"} <= seen
    heavy = sorted(m for m in seen if m.split(".")[0] in ("transformers", "peft", "bitsandbytes")
                   or m.startswith(("torch._dynamo", "torch._inductor", "shardtune.model", "shardtune.finetuning")))
    assert not heavy, heavy


_PROBE_DATASET = """
import os
from probe_collate import ModulesSeen  # importable (on PYTHONPATH), so it reaches the workers


def get_custom_dataset(dataset_config, tokenizer, split):
    return [{"input_ids": [1, 5, 6, 7], "labels": [1, 5, 6, 7]}] * 8


def get_data_collator(tokenizer):
    return ModulesSeen(tokenizer.pad_token_id, os.environ["PROBE_SEEN"])
"""


def test_python_m_shardtune_finetuning_workers_do_not_run_the_recipe_again(tmp_path, tiny_model_dir):
    """``python -m shardtune.finetuning`` (llama-recipes' entry, torchrun's ``-m`` form) runs a
    package's ``__main__``: its fork server takes the light preload and no worker runs the recipe
    module again (as one run by the module's own name would: ~7 s CPU a rank)."""
    (tmp_path / "probe_collate.py").write_text(_PROBE_COLLATOR)
    (tmp_path / "probe_data.py").write_text(_PROBE_DATASET)
    seen_file = tmp_path / "seen.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "PROBE_SEEN": str(seen_file), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "shardtune.finetuning", "--model_name", str(tiny_model_dir),
                           "--dataset", "custom_dataset", "--custom_dataset.file", str(tmp_path / "probe_data.py"),
                           "--batching_strategy", "padding", "--device", "cpu", "--num_workers_dataloader", "1",
                           "--max_train_step", "1", "--run_validation", "false", "--save_model", "false",
                           "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "found in sys.modules" not in proc.stderr
    seen = set(seen_file.read_text().split())
    assert {"torch", "shardtune.data.workers", "probe_collate"} <= seen
    heavy = sorted(m for m in seen if m.split(".")[0] in ("transformers", "peft", "bitsandbytes")
                   or m.startswith(("torch._dynamo", "shardtune.model", "shardtune.finetuning")))
    assert not heavy, heavy
