"""Runs several FSDP fine-tunes in one torchrun launch (start-up costs ~10 s per launch here).

    torchrun --nproc_per_node 2 fsdp_worker.py CASES.json OUT.json
    torchrun --nproc_per_node 2 fsdp_worker.py --serve QUEUE_DIR

The second form is what the test suite uses (tests/conftest.py ``run_fsdp_cases``): one launch for
the whole session that serves every module's case files in turn. It reads request ``QUEUE_DIR/<k>.json``
(``{"cases": CASES.json, "out": OUT.json}``, k = 0, 1, ...), runs its cases as the first form does,
and rank 0 writes OUT.json and then ``QUEUE_DIR/<k>.done``; a ``QUEUE_DIR/stop`` file ends it, and
so does the end of the process named in ``QUEUE_DIR/owner`` ("PID:CREATE_TIME", a killed pytest). A
case that fails (not an expected ``ShardtuneError``) ends the launch as in the first form.

CASES.json maps a case name to {"args": [recipe flags], "kind": "train" | "logits" | "adapter" | "data" | "llama_recipes_fsdp1" | "shard_bytes"} (plus
"expect_error": true to record a ShardtuneError's message instead of failing); cases run in order.
"train" runs the real recipe (setup + train, saving if the flags say so) and records the per-step
losses, which parameters changed, how many tensors the optimizer holds and the trained model's
logits on a fixed input (an image + text probe for a vision model), and with "record_weights": true
the trained weights; "logits" builds the model the way the recipe
does and records its logits on a fixed input (and whether its head is tied to the embeddings);
"adapter" builds it and records the full values of its new adapter weights; "data" loads the train and test
splits on every rank as the recipe does (``data_share``) and records each rank's samples and report;
"llama_recipes_fsdp1"
(with "model" and "root" instead of "args") writes llama-recipes' FSDP1 sharded checkpoint of "model"
in ROOT/llama-recipes (see run_llama_recipes_fsdp1); "shard_bytes" records every rank's bytes of parameter,
gradient and optimizer-state storage after one step (tests/plan/shard_worker.py ``run_case``) as a list
indexed by rank. ``"logits": false`` skips
the logits of a "train" case (a real-vocabulary model's are megabytes of JSON). Rank 0 writes OUT.json.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch

from shardtune.config import ShardtuneError, parse_args
from shardtune.finetuning import merge_saved_adapter, setup, setup_model, train
from shardtune.model.family import family_of
from shardtune.model.loading import load_inputs
from shardtune.model.probes import probe_inputs, probe_logits
from shardtune.parallel.distributed import init_distributed, shutdown


PROBE = "The quick brown fox jumps over the lazy dog."
# A rank stuck longer than this in one case (or in shutting down) prints every thread's stack to
# stderr and exits, so a hang fails the test quickly and says where it was.
CASE_TIMEOUT_S = float(os.environ.get("SHARDTUNE_TEST_CASE_TIMEOUT_S", "180"))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bytes (a 4-bit weight's packed bytes, stored in a float dtype, may read as NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


@torch.no_grad()
def logits_of(model: torch.nn.Module, tokenizer, env) -> list:
    from shardtune.parallel.fsdp import reshard

    model.eval()
    if family_of(model).is_vision:  # an image batch: the vision tower and cross-attention count
        logits = probe_logits(model, probe_inputs(model)).tolist()
    else:
        ids = torch.tensor([tokenizer.encode(PROBE)], device=env.device)
        logits = model(input_ids=ids, use_cache=False).logits.float().cpu().tolist()
    reshard(model)
    return logits


def head_is_tied(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings().weight is base.get_input_embeddings().weight


def gradients_held(model: torch.nn.Module) -> list[bool]:
    """Where the gradients of the micro-batches run so far are: [in a sharded .grad, in FSDP2's
    running sum of reduce-scattered but not yet all-reduced gradients (HSDP, NO_SHARD; its private
    ``_partial_reduce_output``, read here only to observe the reduction schedule)]."""
    from torch.distributed.fsdp import FSDPModule

    groups = [g for m in model.modules() if isinstance(m, FSDPModule) for g in m._get_fsdp_state()._fsdp_param_groups]
    return [any(p.grad is not None for p in model.parameters() if p.requires_grad),
            any(getattr(g, "_partial_reduce_output", None) is not None for g in groups)]


def run_train(cfg, env, record_weights: bool = False, record_logits: bool = True) -> dict:
    c = setup(cfg, env)
    held = []  # as each training micro-batch starts: see gradients_held
    loss_fn = c.loss_fn

    def recording(model, batch):
        if model.training:  # not the evaluation's batches
            held.append(gradients_held(model))
        return loss_fn(model, batch)

    c.loss_fn = recording
    before = snapshot(c.model)
    results = train(cfg, env, c)
    merge_saved_adapter(cfg, env, results)  # --merge_lora: what run() does once the process group is gone
    after = snapshot(c.model)
    trained_logits = logits_of(c.model, c.tokenizer, env) if record_logits else None
    changed = sorted(n for n in before if not bitwise_equal(before[n], after[n]))
    weights = {n: t.tolist() for n, t in after.items()} if record_weights else None
    return {"weights": weights, "losses": results["train_step_loss"], "eval_loss": results["best_eval_loss"],
            "changed": changed, "all_params": sorted(before),
            "optimizer_tensors": sum(len(g["params"]) for g in c.optimizer.param_groups),
            "trainable": sorted(n for n, p in c.model.named_parameters() if p.requires_grad),
            "param_dtypes": sorted({str(p.dtype) for p in c.model.parameters()}),
            "logits": trained_logits, "tied": head_is_tied(c.model), "gradients_held": held,
            "unsharded": sorted(n for n, p in c.model.named_parameters() if not hasattr(p, "to_local"))}


@torch.no_grad()
def run_logits(cfg, env) -> dict:
    tokenizer = load_inputs(cfg.train.model_name)
    model = setup_model(cfg, env, tokenizer)
    return {"logits": logits_of(model, tokenizer, env), "tied": head_is_tied(model)}


@torch.no_grad()
def run_adapter(cfg, env) -> dict:
    tokenizer = load_inputs(cfg.train.model_name)
    model = setup_model(cfg, env, tokenizer)
    return {n: full(p.detach()).tolist() for n, p in model.named_parameters() if ".lora_" in n or ".adaption_" in n}


def run_data(cfg, env) -> list:
    """Every rank's train and test splits as ``setup_data`` loads them (each rank checking its share of
    the images): samples (image references described), the report, and which rows' embedded images
    this rank decoded as it read them (``StoredImage.problem`` set) and which it left unread."""
    import dataclasses

    from shardtune.data import load_split
    from shardtune.data.images import describe
    from shardtune.data.stored_images import StoredImage
    from shardtune.finetuning import data_share

    tokenizer = load_inputs(cfg.train.model_name)
    mine = {}
    for split in ("train", "test"):
        loaded = load_split(cfg, tokenizer, split, data_share(env))
        stored = [(p, s["images"][0]) for p, s in zip(loaded.positions, loaded.samples)
                  if isinstance(s["images"][0], StoredImage)]
        mine[split] = {"samples": [sample_record(s, describe) for s in loaded.samples],
                       "report": dataclasses.asdict(loaded.report),
                       "read_checked": [p for p, ref in stored if ref.problem is not None],
                       "read_unchecked": [p for p, ref in stored if ref.problem is None]}
    return env.all_gather_object(mine)


def sample_record(sample: dict, describe) -> dict:
    """A vision sample as JSON: its token lists and its images' references described."""
    return {**{k: list(sample[k]) for k in ("input_ids", "labels", "attention_mask")},
            "images": [describe(ref) for ref in sample["images"]]}


def run_llama_recipes_fsdp1(model_dir: str, root: Path, rank: int) -> None:
    """What llama-recipes' ``save_model_and_optimizer_sharded`` writes: FSDP1
    (``FullyShardedDataParallel`` + activation-checkpoint wrappers) after one AdamW step,
    ``SHARDED_STATE_DICT``, ``{"model": model.state_dict(), "optim": FSDP.optim_state_dict(...)}``
    saved with ``dist_cp.save(..., storage_writer=FileSystemWriter(dir))`` and a flat
    ``train_params.yaml`` in ``ROOT/llama-recipes``; plus ``ROOT/llama-recipes-full/tiny-1.pt``, its
    FULL_STATE_DICT (the reference weights), saved like ``save_fsdp_model_checkpoint_full``."""
    import functools

    import torch.distributed as dist
    import yaml
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(7)  # the same perturbation on every rank (FSDP1 on CPU cannot sync_module_states)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    model = FSDP(model, auto_wrap_policy=policy, use_orig_params=False, device_id=torch.device("cpu"))
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(100 + rank)
    ids = torch.randint(4, 200, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    save_dir = root / "llama-recipes"
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        state_dict = {"model": model.state_dict(), "optim": FSDP.optim_state_dict(model, optim)}
        dist_cp.save(state_dict=state_dict, storage_writer=dist_cp.FileSystemWriter(save_dir))
    dist.barrier()
    full_cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, full_cfg):
        full = model.state_dict()
    if rank == 0:
        # llama-recipes' save_train_params: train_config + fsdp_config, flat, values as strings
        params = {"model_name": model_dir, "enable_fsdp": "True", "lr": "0.001",
                  "dist_checkpoint_root_folder": str(root), "dist_checkpoint_folder": "llama-recipes",
                  "checkpoint_type": "StateDictType.SHARDED_STATE_DICT", "mixed_precision": "True"}
        (save_dir / "train_params.yaml").write_text(yaml.dump(params, indent=4))
        (root / "llama-recipes-full").mkdir(exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in full.items()}, root / "llama-recipes-full" / "tiny-1.pt")
    dist.barrier()


def shard_worker():
    """tests/plan/shard_worker.py as a module, loaded by path (this script's folder is tests/parallel)."""
    import importlib.util

    if "shard_worker" not in sys.modules:
        spec = importlib.util.spec_from_file_location("shard_worker", Path(__file__).parent.parent / "plan" / "shard_worker.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["shard_worker"] = module
    return sys.modules["shard_worker"]


def run_cases(cases: dict, env, out: dict) -> None:
    """Run ``cases`` in order, filling ``out`` (so what ran before a failure is kept)."""
    for name, case in cases.items():
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        print(f"rank {env.rank}: case {name}: start at {time.monotonic():.2f}", file=sys.stderr, flush=True)
        if case.get("kind") == "llama_recipes_fsdp1":  # not the recipe: no flags to parse
            run_llama_recipes_fsdp1(case["model"], Path(case["root"]), env.rank)
            out[name] = {}
            continue
        if case.get("kind") == "shard_bytes":  # tests/plan/shard_worker.py's measurement, every rank's
            import torch.distributed as dist

            everyone: list = [None] * env.world_size
            dist.all_gather_object(everyone, shard_worker().run_case(case["args"], env))
            out[name] = everyone
            continue
        cfg = parse_args(case["args"]).config
        runner = {"logits": run_logits, "adapter": run_adapter, "data": run_data}.get(case.get("kind"), run_train)
        if case.get("expect_error"):
            try:
                runner(cfg, env)
                out[name] = {"error": None}
            except ShardtuneError as exc:
                out[name] = {"error": str(exc)}
            continue
        if runner is run_train:
            out[name] = run_train(cfg, env, record_weights=bool(case.get("record_weights")),
                                  record_logits=case.get("logits", True))
        else:
            out[name] = runner(cfg, env)
        if env.is_main:
            print(f"case {name}: done at {time.monotonic():.2f}", flush=True)


def write_json(path: str, value) -> None:
    """Whole or not at all: the test side reads OUT.json as soon as it sees it."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(value, f)
    os.replace(f"{path}.tmp", path)


def owner_gone(owner: str) -> bool:
    """The process that asked for this launch ("PID:CREATE_TIME") has ended (a killed pytest)."""
    import psutil

    pid, started = owner.split(":")
    try:
        return psutil.Process(int(pid)).create_time() != float(started)
    except psutil.NoSuchProcess:
        return True


def serve(queue: Path, env) -> None:
    """Serve requests ``queue/<k>.json`` until ``queue/stop`` appears or the pytest process that
    started this launch is gone (see the module docstring)."""
    owner = (queue / "owner").read_text()
    k = 0
    while True:
        request = queue / f"{k}.json"
        wait = 0.02
        while not request.is_file():  # another process's event: poll, less often the longer idle
            if (queue / "stop").is_file() or owner_gone(owner):
                return
            time.sleep(wait)
            wait = min(wait * 1.5, 0.5)
        paths = json.loads(request.read_text())
        out = {}
        try:
            run_cases(json.loads(Path(paths["cases"]).read_text()), env, out)
        finally:
            if env.is_main:
                write_json(paths["out"], out)
        faulthandler.cancel_dump_traceback_later()  # idle until the next request is no hang
        if env.is_main:
            (queue / f"{k}.done").touch()
        k += 1


def main() -> None:
    serving = sys.argv[1] == "--serve"
    cases = None if serving else json.loads(open(sys.argv[1]).read())
    env = init_distributed("cpu", need_group=True)
    out = {}
    try:
        if serving:
            serve(Path(sys.argv[2]), env)
        else:
            run_cases(cases, env, out)
    finally:
        if env.is_main and not serving:
            write_json(sys.argv[2], out)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        print(f"rank {env.rank}: shutting down", file=sys.stderr, flush=True)
        shutdown()


if __name__ == "__main__":
    from shardtune.exits import run_with_clean_errors

    run_with_clean_errors(main)  # a rank ends without interpreter teardown (see end_process)
