"""torchtune's rows of the peer benchmark (runs in the peer virtual environment).

torchtune's own single-device full fine-tuning recipe (``recipes/full_finetune_single_device.py``
from the torchtune wheel, ``FullFinetuneRecipeSingleDevice``) with a config built here: the HF
directory loaded by ``FullModelHFCheckpointer`` (``hf_to_tune`` weight conversion) into the
matching builder (``llama3``: plain RoPE, separate LM head; ``llama3_2``: Llama 3.2's scaled RoPE
and tied embeddings), ``CEWithChunkedOutputLoss``, ``torch.optim.AdamW``, no LR scheduler, no
clipping, ``shuffle: False``, ``log_every_n_steps: 1``. fp32 on CPU; on a GPU torchtune trains in
pure bf16 (``dtype: bf16``: bf16 weights and optimizer state, no fp32 master copy), which is
torchtune's way and not the autocast of the other rows. Padded mode: ``padded_collate_sft`` (no
attention mask: right padding under a causal mask). Packed mode: rows in ``PackedDataset``'s
format, collated by ``padded_collate_packed`` into a block-causal mask per document (flex
attention on a recent GPU, a dense mask elsewhere). The recipe's end-of-epoch checkpoint save
is skipped (the other frameworks save nothing either).

    PEER_PY -m benchmarks.peer_runners.torchtune_runner SPEC.json      (from the repository root)
"""

from __future__ import annotations

import json
from pathlib import Path

from . import _runner

COMPONENTS = f"{__package__}.tt_components"  # torchtune imports ``_component_`` paths itself


def model_config(model_dir: str, seq_len: int) -> tuple[dict, str]:
    """(torchtune builder config, checkpointer model_type) for the HF Llama in ``model_dir``."""
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    common = dict(vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
                  num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
                  embed_dim=hf["hidden_size"], max_seq_len=seq_len,
                  intermediate_dim=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"],
                  rope_base=theta)
    if rope.get("rope_type") == "llama3" or hf.get("tie_word_embeddings"):
        if rope.get("rope_type") != "llama3" or not hf.get("tie_word_embeddings"):
            raise SystemExit("torchtune: llama3_2 is Llama 3.2's tied embeddings with its scaled RoPE; "
                             "this model has only one of the two")
        return {"_component_": "torchtune.models.llama3_2.llama3_2", **common,
                "scale_factor": int(rope["factor"]), "tie_word_embeddings": True}, "LLAMA3_2"
    return {"_component_": "torchtune.models.llama3.llama3", **common}, "LLAMA3"


def recipe_config(spec: dict, mode: str) -> dict:
    model, model_type = model_config(spec["model_dir"], spec["seq_len"])
    out = Path(spec["workdir"]) / f"torchtune_{mode}_out"
    files = sorted(p.name for p in Path(spec["model_dir"]).glob("*.safetensors"))
    return {
        "output_dir": str(out), "device": spec["device"], "dtype": spec["dtype"], "seed": spec["seed"],
        "shuffle": False, "batch_size": spec["batch_size"], "epochs": 1,
        "max_steps_per_epoch": spec["steps"], "gradient_accumulation_steps": 1,
        "optimizer_in_bwd": False, "compile": False, "resume_from_checkpoint": False,
        "enable_activation_checkpointing": False, "enable_activation_offloading": False,
        "clip_grad_norm": None, "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "model": model,
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": spec["model_dir"], "checkpoint_files": files,
                         "model_type": model_type, "output_dir": str(out)},
        "tokenizer": {"_component_": f"{COMPONENTS}.PlanTokenizer", "pad_id": spec["pad_id"],
                      "max_seq_len": spec["seq_len"]},
        "dataset": {"_component_": f"{COMPONENTS}.plan_dataset", "plan": spec["plans"][mode],
                    "packed": mode == "packed"},
        "collate_fn": "torchtune.data.padded_collate_sft",
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": spec["lr"],
                      "betas": list(spec["betas"]), "eps": spec["eps"],
                      "weight_decay": spec["weight_decay"]},
        "metric_logger": {"_component_": f"{COMPONENTS}.StepClockLogger"},
    }


def recipe_file() -> Path:
    """The recipe shipped in the torchtune wheel's top-level ``recipes`` folder (which refuses
    ``import recipes``: torchtune's ``tune run`` loads recipes by path, and so does this)."""
    import importlib.util

    spec = importlib.util.find_spec("recipes")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "full_finetune_single_device.py"
        if path.is_file():
            return path
    raise SystemExit("torchtune's recipes/full_finetune_single_device.py is not installed")


def load_recipe_class():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tt_full_finetune_single_device", recipe_file())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FullFinetuneRecipeSingleDevice


def run(spec: dict, mode: str) -> dict:
    from omegaconf import OmegaConf

    class Recipe(load_recipe_class()):
        def save_checkpoint(self, epoch: int) -> None:
            pass  # nothing is saved by the other frameworks' runs either

    plan = _runner.load_plan(spec["plans"][mode])
    cfg = OmegaConf.create(recipe_config(spec, mode))
    with _runner.MemoryProbe(spec["device"]) as mem:
        recipe = Recipe(cfg=cfg)
        recipe.setup(cfg=cfg)
        logger = recipe._metric_logger
        logger.cuda = spec["device"] == "cuda"
        # The sampler does not shuffle: a fresh pass over the loader yields the batches train() gets.
        seen = []
        for i, batch in enumerate(recipe._dataloader):
            if i == spec["steps"]:
                break
            seen.append(_runner.checksum(batch["tokens"], plan["pad_id"]))
        _runner.check_first_batches(seen, plan, "torchtune")
        recipe.train()
        recipe.cleanup()
    return {"framework": "torchtune", "mode": mode, "step_ends": logger.ends, "losses": logger.losses,
            "memory": mem.result(), "versions": _runner.versions("torchtune", "torchao"),
            "config": OmegaConf.to_container(cfg)}


if __name__ == "__main__":
    _runner.run_modes(run)
