"""LoRA on a tied, real-vocabulary Llama (Llama 3.2 1B/3B's shape, small width), 2 real ranks with
--low_cpu_fsdp: step checkpoints, the adapter, the merged export and `shardtune convert` of a step
checkpoint hold what their sizes say — trainable state only, never the frozen 128,256-row embedding
under its tied name ``lm_head.weight`` — and a resume from such a checkpoint continues the
uninterrupted run exactly. One torchrun launch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from shardtune.checkpoint import layout

FLOAT32 = 4
HEADER = 64 * 1024  # a safetensors header (names, shapes, offsets) is far below this here
DCP_PER_ITEM = 2 * 1024  # DCP's overhead per stored item (a tensor shard, a step count, a hyperparameter)


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"Spell {i}.", "output": " ".join(str(i))} for i in range(n)]


@pytest.fixture(scope="module")
def runs(real_vocab_tied_model_dir, tmp_path_factory, run_fsdp_cases):
    root = tmp_path_factory.mktemp("tied-lora")
    data = root / "data.json"
    data.write_text(json.dumps(_rows(25)))  # 24 train rows: 6 steps per epoch on 2 ranks x batch 2
    base = ["--model_name", str(real_vocab_tied_model_dir), "--dataset", "alpaca_dataset",
            "--alpaca_dataset.data_path", str(data), "--device", "cpu", "--batching_strategy", "padding",
            "--context_length", "64", "--lr", "2e-3", "--seed", "3", "--num_epochs", "2",
            "--run_validation", "False", "--batch_size_training", "2", "--enable_fsdp", "--low_cpu_fsdp",
            "--use_peft", "--peft_method", "lora"]
    out = root / "run"
    cases = {
        "uninterrupted": {"logits": False, "args": [*base, "--save_model", "False", "--output_dir", str(root / "ref")]},
        # checkpoints at steps 4, 6 (epoch end, with an adapter), 8 and 9 (the truncated epoch's end, with
        # the adapter and its merged model)
        "first_part": {"logits": False, "args": [*base, "--output_dir", str(out), "--save_every_n_steps", "4",
                                                 "--max_train_step", "9", "--merge_lora"]},
        "resumed": {"logits": False, "args": [*base, "--save_model", "False", "--output_dir", str(out),
                                              "--resume"]},
    }
    return {"results": run_fsdp_cases(root, cases), "out": out, "model": real_vocab_tied_model_dir}


def _numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def _adapter_params(out: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _base(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_resume_of_a_tied_lora_checkpoint_continues_the_uninterrupted_run(runs):
    r = runs["results"]
    full, first, resumed = (r[k]["losses"] for k in ("uninterrupted", "first_part", "resumed"))
    assert len(full) == 12 and len(first) == 9
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(first, full[:9]))
    # the newest checkpoint of the first part is step 9, mid-epoch: the resumed run goes on from step 10
    assert len(resumed) == 3 and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(resumed, full[9:])), \
        (resumed, full[9:])
    assert r["resumed"]["changed"] and all(".lora_" in n for n in r["resumed"]["changed"])


def test_step_checkpoints_hold_the_adapter_and_its_optimizer_state_only(runs):
    from torch.distributed.checkpoint import FileSystemReader

    run = runs["out"] / "checkpoints" / "fine-tuned"
    done = layout.complete_checkpoints(run)
    assert [p.name for p in done] == ["step-000004", "step-000006", "step-000008", "step-000009"]
    adapter = _adapter_params(runs["out"])
    adapter_bytes = _numel(adapter.values()) * FLOAT32
    embedding_bytes = 128_256 * 64 * FLOAT32
    for ckpt in done:
        metadata = FileSystemReader(str(ckpt)).read_metadata()
        meta = metadata.state_dict_metadata
        model_keys = sorted(k for k in meta if k.startswith("model."))
        assert model_keys and all(".lora_" in k for k in model_keys), [k for k in model_keys if ".lora_" not in k]
        assert len(model_keys) == len(adapter)
        assert not [k for k in meta if "embed_tokens" in k or "lm_head" in k]
        # the weights, AdamW's two moments (and its step counts): three copies of the adapter
        shards = sum(p.stat().st_size for p in ckpt.glob("*.distcp"))
        assert 3 * adapter_bytes <= shards <= 3 * adapter_bytes + DCP_PER_ITEM * len(metadata.storage_data), \
            (shards, adapter_bytes, len(metadata.storage_data))
        assert shards < embedding_bytes / 100


def test_adapter_and_merged_export_sizes(runs):
    out = runs["out"]
    adapter = _adapter_params(out)
    assert adapter and all(".lora_" in k for k in adapter)
    # r=8 on q_proj (64 -> 64) and v_proj (64 -> 32, 2 KV heads of 16) in 2 layers
    assert _numel(adapter.values()) == 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    size = (out / "adapter_model.safetensors").stat().st_size
    assert _numel(adapter.values()) * FLOAT32 <= size <= _numel(adapter.values()) * FLOAT32 + HEADER
    # the merged model: every base weight once (the tied head is not written twice)
    base = _base(runs["model"])
    expected = sum(p.numel() for p in base.parameters()) * FLOAT32
    files = sorted((out / "merged").glob("*.safetensors"))
    written = sum(p.stat().st_size for p in files)
    assert expected <= written <= expected + HEADER, (written, expected)


def test_convert_of_a_tied_lora_step_checkpoint_writes_the_adapter_only(runs, tmp_path):
    from safetensors.torch import load_file

    from shardtune.convert.core import convert

    ckpt = runs["out"] / "checkpoints" / "fine-tuned" / "step-000009"
    summary = convert(ckpt, tmp_path / "adapter", log=lambda _: None)
    assert summary["adapter"]
    converted = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    exported = load_file(str(runs["out"] / "adapter_model.safetensors"))  # saved at the same step (9)
    assert converted.keys() == exported.keys()
    assert all(torch.equal(converted[k], exported[k]) for k in exported)
