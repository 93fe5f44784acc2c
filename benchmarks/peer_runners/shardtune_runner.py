"""shardtune's rows of the peer benchmark: the recipe (``shardtune.finetuning.setup`` + ``train``,
llama-recipes flags parsed by ``shardtune.config.parse_args``) in one process, as
benchmarks.throughput runs it, with a step hook that stamps the end of every step. The
``shardtune_plain`` rows add ``--loss plain`` and torch's default AdamW implementation for the
device (for-loop on CPU, foreach on CUDA), the kernels HF Trainer and TRL use.

Also the source of the batch plan: ``plan_batches`` asks the recipe's own ``setup_data`` for its
loader and records the first ``steps`` batches, which every other framework then replays. The run
checks that the batches it trained on are those of the plan.

    .venv/bin/python -m benchmarks.peer_runners.shardtune_runner SPEC.json      (from the repository root)
"""

from __future__ import annotations

from pathlib import Path

from .. import common
from . import _runner

DATA_FILE = Path(__file__).resolve().parent / "shardtune_data.py"
STRATEGY = {"padded": "padding", "packed": "packing"}


def recipe_args(spec: dict, mode: str, output_dir: str) -> list[str]:
    """The llama-recipes command line of this run (also printed in the benchmark's JSON)."""
    a = ["--model_name", spec["model_dir"], "--dataset", "custom_dataset",
         "--custom_dataset.file", str(DATA_FILE), "--custom_dataset.data_path", spec["docs"],
         "--batching_strategy", STRATEGY[mode], "--context_length", str(spec["seq_len"]),
         "--batch_size_training", str(spec["batch_size"]), "--gradient_accumulation_steps", "1",
         "--num_epochs", "1", "--max_train_step", str(spec["steps"]), "--device", spec["device"],
         "--lr", repr(spec["lr"]), "--weight_decay", repr(spec["weight_decay"]),
         "--scheduler", "constant", "--warmup_steps", "0", "--gradient_clipping", "False",
         "--save_model", "False", "--run_validation", "False", "--num_workers_dataloader", "0",
         "--seed", str(spec["seed"]), "--output_dir", output_dir]
    if spec["dtype"] == "fp32":
        a += ["--mixed_precision", "False"]
    if spec.get("framework") == "shardtune_plain":  # the peers' kernels: plain loss, torch's default AdamW
        a += ["--loss", "plain", "--optimizer_impl", "foreach" if spec["device"] == "cuda" else "for_loop"]
    return a


def plan_batches(spec: dict, mode: str) -> list[dict]:
    """The first ``spec['steps']`` micro-batches of the recipe's train loader (its sampler,
    seed, length grouping or best-fit packing), as collated tensors."""
    import shardtune.finetuning as recipe
    from shardtune.config import parse_args
    from shardtune.model.family import family_for_config
    from shardtune.model.loading import load_config, load_inputs
    from shardtune.parallel.distributed import DistEnv

    cfg = parse_args(recipe_args(spec, mode, str(Path(spec["workdir"]) / "plan_unused"))).config
    tokenizer = load_inputs(cfg.train.model_name, cfg.train.tokenizer_name)
    family = family_for_config(load_config(cfg.train.model_name))
    import torch

    loader, _ = recipe.setup_data(cfg, tokenizer, DistEnv(device=torch.device(spec["device"])), family)
    loader.batch_sampler.set_epoch(0)
    if len(loader) < spec["steps"]:
        raise SystemExit(f"{mode}: the data gives {len(loader)} batches, fewer than {spec['steps']} steps")
    batches = []
    for batch in loader:
        batches.append({k: v for k, v in batch.items() if hasattr(v, "shape")})
        if len(batches) == spec["steps"]:
            break
    return batches


class _ClockHook:
    """A step hook for the recipe's ``train(..., extra_hooks=[...])``."""

    def __init__(self, clock: _runner.StepClock) -> None:
        self.clock = clock

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, result) -> None:
        self.clock.stamp()


def run(spec: dict, mode: str) -> dict:
    import shardtune.finetuning as recipe
    from shardtune.config import parse_args
    from shardtune.parallel.distributed import init_distributed

    plan = _runner.load_plan(spec["plans"][mode])
    out = Path(spec["workdir"]) / f"shardtune_{mode}_out"
    args = recipe_args(spec, mode, str(out))
    cfg = parse_args(args).config
    clock = _runner.StepClock(spec["device"])
    with _runner.MemoryProbe(spec["device"]) as mem:
        env = init_distributed(spec["device"], need_group=False)
        c = recipe.setup(cfg, env)
        checked = common.RecordingLoader(c.train_loader,
                                         lambda batch: _runner.checksum(batch["input_ids"], plan["pad_id"]))
        c.train_loader = checked
        results = recipe.train(cfg, env, c, extra_hooks=[_ClockHook(clock)])
    _runner.check_first_batches(checked.records, plan, "shardtune")
    return {"framework": spec.get("framework", "shardtune"), "mode": mode, "step_ends": clock.ends,
            "losses": list(results["train_step_loss"]), "memory": mem.result(),
            "versions": _runner.versions("shardtune"), "command": ["python", "-m", "shardtune.finetuning", *args]}


if __name__ == "__main__":
    _runner.run_modes(run)
