"""Llama 3.2 Vision (tiny Mllama) under FSDP2 with 2 real ranks: equal to one process, every
strategy, freezing, LoRA, low-CPU loading, bf16, export, conversion and exact resume.

All 2-rank runs share one torchrun launch (see fsdp_worker.py); the probe is an image + text
batch (``model/probes.py``), so the vision tower and the cross-attention layers count.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from shardtune.finetuning import main as finetune

RTOL = 1e-4
COOKBOOK_FILE = Path(__file__).parents[1] / "data" / "vision_custom_dataset.py"


def _close(a: list[float], b: list[float], rtol: float = RTOL) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def setting(tiny_vision_model_dir, colour_rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-vision")
    common = ["--model_name", str(tiny_vision_model_dir), "--dataset", "ocrvqa_dataset",
              "--ocrvqa_dataset.data_path", str(colour_rows), "--batching_strategy", "padding",
              "--output_dir", str(root / "out"), "--save_model", "False", "--run_validation", "False",
              "--num_epochs", "1", "--max_train_step", "3", "--lr", "2e-3", "--seed", "1", "--device", "cpu",
              "--num_workers_dataloader", "0", "--gradient_clipping", "--gradient_clipping_threshold", "1.0"]
    return {"root": root, "common": common, "model": tiny_vision_model_dir}


def _fsdp(common: list[str], *extra: str) -> list[str]:
    return [*common, "--batch_size_training", "2", "--enable_fsdp", *extra]


def _single(common: list[str], *extra: str) -> list[str]:
    return [*common, "--batch_size_training", "4", *extra]


# dropout off: the ranks' dropout masks come from other RNG streams than one process's
LORA = ("--use_peft", "--peft_method", "lora", "--lora_config.lora_dropout", "0")


def _with(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


@pytest.fixture(scope="module")
def results(setting, run_fsdp_cases):
    c, root = setting["common"], setting["root"]
    full_out = str(root / "full-out")
    resume_out = str(root / "resume-out")
    cases = {
        # default: activation checkpointing of both towers, a DataLoader worker, validation, an
        # export and step checkpoints
        "full": {"record_weights": True,
                 "args": _fsdp(_with(_with(c, "--num_workers_dataloader", "1"), "--run_validation", "True"),
                               "--save_model", "True", "--output_dir", full_out, "--save_every_n_steps", "2")},
        "no_activation_checkpointing": {"args": _fsdp(c, "--fsdp_config.fsdp_activation_checkpointing", "False")},
        "shard_grad_op": {"args": _fsdp(c, "--fsdp_config.sharding_strategy", "SHARD_GRAD_OP")},
        "no_shard": {"args": _fsdp(c, "--fsdp_config.sharding_strategy", "NO_SHARD")},
        "hybrid_2x1": {"args": _fsdp(c, "--fsdp_config.sharding_strategy", "HYBRID_SHARD",
                                     "--fsdp_config.sharding_group_size", "1", "--fsdp_config.replica_group_size", "2")},
        "low_cpu": {"args": _fsdp(c, "--low_cpu_fsdp")},
        "freeze_llm": {"args": _fsdp(c, "--freeze_LLM_only", "True")},
        "freeze_vision": {"args": _fsdp(c, "--freeze_vision_tower")},
        "lora": {"args": _fsdp(c, *LORA, "--save_model", "True",
                               "--output_dir", str(root / "lora-out"))},
        "lora_low_cpu": {"args": _fsdp(c, *LORA, "--low_cpu_fsdp")},
        "pure_bf16": {"args": _fsdp(c, "--fsdp_config.pure_bf16")},
        "logits_normal": {"kind": "logits", "args": _fsdp(c)},
        "logits_low_cpu": {"kind": "logits", "args": _fsdp(c, "--low_cpu_fsdp")},
        "uninterrupted": {"args": _fsdp(_with(c, "--max_train_step", "5"))},
        "first_part": {"args": _fsdp(_with(c, "--max_train_step", "2"), "--save_every_n_steps", "2",
                                     "--output_dir", resume_out)},
        "resumed": {"args": _fsdp(_with(c, "--max_train_step", "5"), "--save_every_n_steps", "2",
                                  "--output_dir", resume_out, "--resume")},
        # seed 004's command with a llama-cookbook style --custom_dataset.file whose collator
        # returns the processor's BatchFeature (a UserDict) unchanged
        "cookbook_custom_dataset": {"args": _fsdp(_cookbook(c, root), *LORA)},
        # the same image conversations as --dataset chat_dataset rows
        "chat": {"args": _fsdp(_chat(c, setting))},
    }
    return run_fsdp_cases(root, cases)


def _cookbook(common: list[str], root: Path) -> list[str]:
    import shutil

    dataset = shutil.copy(COOKBOOK_FILE, root / "ocrvqa_dataset.py")
    args = _with(common, "--dataset", "custom_dataset")
    args[args.index("--ocrvqa_dataset.data_path")] = "--custom_dataset.data_path"
    return [*args, "--custom_dataset.file", str(dataset), "--custom_dataset.test_split", "test"]


def _chat(common: list[str], setting: dict) -> list[str]:
    """The common flags on --dataset chat_dataset, over the_cauldron rows written as chat rows
    (an image part and the question, then the answer) beside them."""
    import json

    source = Path(common[common.index("--ocrvqa_dataset.data_path") + 1])
    data = source.parent / "chat.jsonl"
    if not data.is_file():
        rows = []
        for line in source.read_text().splitlines():
            row = json.loads(line)
            turn = row["texts"][0]
            rows.append({"images": row["images"], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turn["user"]}]},
                {"role": "assistant", "content": turn["assistant"]}]})
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _with(common, "--dataset", "chat_dataset")
    at = args.index("--ocrvqa_dataset.data_path")
    args[at:at + 2] = ["--chat_dataset.data_path", str(data)]
    return args


@pytest.fixture(scope="module")
def single(setting):
    c, root = setting["common"], setting["root"]
    out = root / "single-out"
    return {"chat": finetune(_single(_chat(c, setting)))["train_step_loss"],"full": finetune(_single(c, "--save_model", "True", "--output_dir", str(out)))["train_step_loss"],
            "full_out": out,
            "lora": finetune(_single(c, *LORA))["train_step_loss"]}


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _vision_model(folder: Path):
    from transformers import MllamaForConditionalGeneration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def test_two_ranks_equal_one_process_in_losses_and_weights(results, single, setting):
    r = results["full"]
    assert len(r["losses"]) == 3 and _close(r["losses"], single["full"]), (r["losses"], single["full"])
    assert r["losses"][-1] < r["losses"][0]
    # The 2-rank export holds the weights one process reaches after the same 3 steps.
    two = _load_weights(setting["root"] / "full-out")
    one = _load_weights(single["full_out"])
    assert set(two) == set(one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_chat_dataset_image_conversations_under_fsdp_equal_one_process(results, single):
    """--dataset chat_dataset with image conversations trains Llama 3.2 Vision on 2 ranks as one process does."""
    r = results["chat"]
    assert len(r["losses"]) == 3 and _close(r["losses"], single["chat"]), (r["losses"], single["chat"])
    assert any("vision_model" in n for n in r["changed"]) and any("cross_attn" in n for n in r["changed"])


@pytest.mark.parametrize("case", ["no_activation_checkpointing", "shard_grad_op", "no_shard", "hybrid_2x1", "low_cpu"])
def test_every_strategy_and_loading_path_gives_the_same_losses(results, case):
    assert _close(results[case]["losses"], results["full"]["losses"]), case


def test_every_tower_trains_in_a_full_fine_tune(results):
    r = results["full"]
    for part in ("vision_model", "multi_modal_projector", "language_model", "cross_attn", "lm_head"):
        assert any(part in n for n in r["changed"]), part


def test_freeze_llm_only_trains_cross_attention_and_vision_and_nothing_else(results):
    r = results["freeze_llm"]
    trainable, changed = set(r["trainable"]), set(r["changed"])
    cross_layers = {n for n in r["all_params"] if ".layers.1." in n and "language_model" in n}  # cross_attention_layers=[1]
    vision = {n for n in r["all_params"] if "vision_model" in n or "multi_modal_projector" in n}
    assert trainable == cross_layers | vision
    assert changed <= trainable and changed & cross_layers and changed & vision
    assert r["optimizer_tensors"] == len(trainable)


def test_freeze_vision_tower_trains_the_language_model_only(results):
    r = results["freeze_vision"]
    tower = {n for n in r["all_params"] if "vision_model" in n or "multi_modal_projector" in n}
    assert tower and set(r["trainable"]) == set(r["all_params"]) - tower
    assert set(r["changed"]) == set(r["trainable"])


def test_lora_targets_the_language_model_and_matches_one_process(results, single, setting):
    r = results["lora"]
    assert r["changed"] and all(".lora_" in n for n in r["trainable"])
    assert all("language_model" in n for n in r["trainable"])  # q_proj/v_proj of the LLM, not the tower
    assert _close(r["losses"], single["lora"]), (r["losses"], single["lora"])
    assert _close(results["lora_low_cpu"]["losses"], single["lora"])


def test_cookbook_custom_dataset_with_batch_feature_batches_trains(results):
    r = results["cookbook_custom_dataset"]
    assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"]), r["losses"]
    assert r["changed"] and all(".lora_" in n for n in r["trainable"])


def test_lora_adapter_loads_with_peft_on_the_vision_model_and_changes_its_logits(results, setting):
    from peft import PeftModel

    from shardtune.model.probes import probe_inputs, probe_logits

    base = _vision_model(setting["model"])
    inputs = probe_inputs(base)
    before = probe_logits(base, inputs)
    adapted = PeftModel.from_pretrained(base, str(setting["root"] / "lora-out")).eval()
    after = probe_logits(adapted, inputs)
    trained = torch.tensor(results["lora"]["logits"])
    torch.testing.assert_close(after, trained, rtol=1e-4, atol=1e-4)
    assert float((after - before).abs().max()) > 1e-3


def test_low_cpu_loading_gives_the_model_of_the_normal_path(results):
    assert torch.equal(torch.tensor(results["logits_low_cpu"]["logits"]), torch.tensor(results["logits_normal"]["logits"]))


def test_pure_bf16_trains_with_bf16_weights(results):
    r = results["pure_bf16"]
    assert r["param_dtypes"] == ["torch.bfloat16"]
    assert all(math.isfinite(x) for x in r["losses"]) and r["changed"]
    assert _close(r["losses"][:1], results["full"]["losses"][:1], rtol=2e-2)


def test_export_loads_with_transformers_and_gives_the_trained_logits(results, setting):
    from transformers import AutoProcessor

    from shardtune.model.probes import probe_inputs, probe_logits

    out = setting["root"] / "full-out"
    model = _vision_model(out)
    torch.testing.assert_close(probe_logits(model, probe_inputs(model)), torch.tensor(results["full"]["logits"]),
                               rtol=1e-5, atol=1e-5)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template and type(processor).__name__ == "MllamaProcessor"
    assert set(_load_weights(out)) == set(_load_weights(setting["model"]))  # save_pretrained's names


def test_step_checkpoint_converts_to_the_exported_tensors(results, setting, tmp_path):
    from shardtune.convert.core import convert

    ckpt = setting["root"] / "full-out" / "checkpoints" / "fine-tuned" / "step-000003"
    convert(ckpt, tmp_path / "hf", verify=True)
    got, want = _load_weights(tmp_path / "hf"), _load_weights(setting["root"] / "full-out")
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_resume_equals_the_uninterrupted_run(results):
    full, first, resumed = (results[k]["losses"] for k in ("uninterrupted", "first_part", "resumed"))
    assert len(full) == 5 and _close(first, full[:2]) and _close(resumed, full[2:]), (full, first, resumed)
    torch.testing.assert_close(torch.tensor(results["resumed"]["logits"]), torch.tensor(results["uninterrupted"]["logits"]),
                               rtol=1e-4, atol=1e-4)


def test_sigterm_saves_a_vision_checkpoint_that_resumes(setting, tmp_path):
    """Pre-emption as for text: SIGTERM to the ranks -> a checkpoint at the step reached, exit 0,
    and --resume continues from it."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from shardtune.checkpoint import layout

    out = tmp_path / "out"
    args = _fsdp(_with(_with(setting["common"], "--output_dir", str(out)), "--max_train_step", "0"),
                 "--num_epochs", "500", "--save_metrics")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             "-m", "shardtune.finetuning", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        end = time.monotonic() + 120
        while not (out / "metrics.json").is_file() and time.monotonic() < end:  # an epoch is done
            time.sleep(0.05)
        for child in psutil.Process(proc.pid).children():  # the ranks, as a cluster would signal them
            child.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                p.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "pre-empted (SIGTERM)" in stdout
    state = json.loads((layout.latest_checkpoint(out / "checkpoints" / "fine-tuned") / "train_state.json").read_text())
    assert state["has_optimizer"] and state["step"] >= 9  # at least the first epoch's 9 steps
    resumed = finetune(_single(_with(_with(setting["common"], "--output_dir", str(out)), "--max_train_step",
                                     str(state["step"] + 1)), "--num_epochs", "500", "--resume"))
    assert resumed["steps"] == state["step"] + 1 and len(resumed["train_step_loss"]) == 1
