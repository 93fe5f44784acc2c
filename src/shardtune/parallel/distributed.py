"""Process-group set-up from torchrun's environment; the one object that knows ranks and devices."""

from __future__ import annotations

import gc
import os
import re
import sys
from dataclasses import dataclass
from typing import NoReturn, Optional

import torch
import torch.distributed as dist

from ..config.configs import Device
from ..config.errors import ShardtuneError
from ..runtime import dist_backend, resolve_device


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (a no-op in a single process) and return it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: object) -> list:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
        if not self.distributed:
            return [obj]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, obj)
        return everyone


# Whether this process has started a process group (see ``end_process``).
_groups_started = 0  # process groups init_distributed started in this process


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_world_size(enable_fsdp: bool, world_size: int) -> None:
    """Several ranks without FSDP would each train their own copy: refuse instead."""
    if world_size > 1 and not enable_fsdp:
        raise ShardtuneError(
            f"{world_size} ranks were launched but --enable_fsdp is not set, so every rank would "
            "train its own unsynchronised copy of the model. Add --enable_fsdp (any "
            "--fsdp_config.sharding_strategy; NO_SHARD is plain data parallelism) or launch one "
            "process.")


def init_distributed(device: Device | str = Device.auto, need_group: bool = False,
                     cpu_collectives: bool = False) -> DistEnv:
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE and start NCCL (GPU) or gloo (CPU).

    Without torchrun's variables this is a single process; a process group is only started
    when ``need_group`` asks for one (FSDP with one rank). ``cpu_collectives``: on a GPU the
    group also gets a gloo backend for tensors in host memory (FSDP CPU offload).
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if (world_size > 1 or need_group) and not dist.is_initialized():
        # One process without torchrun: an in-memory store, so no port is claimed (two such
        # runs on one machine must not meet) and the caller's environment is left as it was.
        store = None if launched_by_torchrun() else dist.HashStore()
        dist.init_process_group(backend=dist_backend(dev, cpu_collectives), rank=rank, world_size=world_size,
                                store=store, device_id=dev if dev.type == "cuda" else None)
        global _groups_started
        _groups_started += 1
    return DistEnv(rank, local_rank, world_size, local_world_size, dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_groups_started() -> int:
    """How many process groups ``init_distributed`` has started in this process so far."""
    return _groups_started


# What gloo and NCCL raise in a rank whose peer has gone (killed, crashed, out of memory) during
# a collective. The cause is the peer, which the launcher names; this rank's traceback would only
# point at the collective it was in.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "remote process exited")


def peer_lost(exc: BaseException) -> Optional[str]:
    """The first line of ``exc`` (or of an exception it came from) when it says that another
    rank of the job has gone, else None."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if any(marker in text for marker in _PEER_LOST):
            first = text.strip().splitlines()[0]
            first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[.../pair.cc:553] " source location
            return first.split(". ")[0]  # and the advice sentences after the fact
        current = current.__cause__ or current.__context__
    return None


def end_process(code: int) -> NoReturn:
    """Exit now with ``code``, skipping interpreter teardown, once a process group has run here.

    ``destroy_process_group`` does not stop gloo's worker threads while FSDP modules and device
    meshes still reference the group, so they meet Python's finalisation: a thread that releases
    a finished collective's tensor then needs the GIL, and Python ends it mid-C++ frame, which
    aborts the process ("terminate called without an active exception", SIGABRT; seen here in
    about 1 of 10 rank exits, pytorch/pytorch#190489 and #75097 report hangs of the same kind).
    The job's work is complete and on disk by now (checkpoints and exports are fsynced), so the
    only thing to keep is what sits in Python's stdout/stderr buffers, and the named semaphores
    of DataLoader worker pools: each pool's queues and stop event hold 11 (``multiprocessing``
    registers them with its resource tracker and unlinks them when they are freed, or at a normal
    exit). A reference cycle through the recipe's frames can keep a loader alive to this point
    (seen on rank 0), and ``os._exit`` skips both the cycle collector and multiprocessing's exit
    hooks, so the tracker reported "22 leaked semaphore objects" at every run's end. Collecting
    the cycles first shuts the pools down and frees their semaphores the ordinary way.
    """
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more to keep
            pass
    os._exit(code)
