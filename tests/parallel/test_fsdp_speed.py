"""Speed and memory options under FSDP2 on 2 real gloo ranks (one torchrun launch, fsdp_worker.py):
the chunked loss gives the plain loss's losses and trained weights (full fine-tuning, LoRA on the
head and the embeddings, tied embeddings, Llama 3.2 Vision), every activation-checkpointing policy gives the losses of
full checkpointing and of none, and the fused / foreach AdamW the for-loop one's. --compile with
activation checkpointing and LoRA gives the eager losses (marked slow; its cases join the same
launch, last, when that test is selected)."""

from __future__ import annotations

import json
import math

import pytest
import torch

RTOL = 1e-4
# LoRA on the head and the embeddings (no dropout: the comparison is between two runs' weights)
LORA_HEAD = ("--use_peft", "--lora_config.target_modules", "q_proj,v_proj,embed_tokens,lm_head",
             "--lora_config.lora_dropout", "0")
CHUNKED = ("--loss", "chunked", "--loss_chunk_tokens", "16")


@pytest.fixture(scope="module")
def setting(tiny_model_dir, tiny_tied_model_dir, tiny_vision_model_dir, colour_rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-speed")
    data = root / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"numbers {i}",
                                 "output": f"The answer is {2 * i + 1}."} for i in range(48)]))

    def args(*extra: str, model=tiny_model_dir) -> list[str]:
        return ["--model_name", str(model), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data),
                "--output_dir", str(root / "out"), "--save_model", "False", "--num_epochs", "1",
                "--max_train_step", "3", "--lr", "1e-3", "--seed", "1", "--device", "cpu", "--context_length", "128",
                "--gradient_accumulation_steps", "2", "--batch_size_training", "2", "--enable_fsdp",
                "--run_validation", "False", *extra]

    def vision(*extra: str) -> list[str]:  # Llama 3.2 Vision: its head is the top-level lm_head
        return ["--model_name", str(tiny_vision_model_dir), "--dataset", "ocrvqa_dataset", "--ocrvqa_dataset.data_path",
                str(colour_rows), "--batching_strategy", "padding", "--output_dir", str(root / "vision-out"),
                "--save_model", "False", "--run_validation", "False", "--num_epochs", "1", "--max_train_step", "3",
                "--lr", "2e-3", "--seed", "1", "--device", "cpu", "--num_workers_dataloader", "0",
                "--batch_size_training", "2", "--enable_fsdp", *extra]

    return {"root": root, "args": args, "tied": tiny_tied_model_dir, "vision": vision}


COMPILE_TEST = "test_compile_with_checkpointing_and_lora_under_fsdp_gives_the_eager_losses"


def compile_cases(a) -> dict:
    packed = ("--batching_strategy", "packing", "--context_length", "64")  # one shape: one compilation
    return {
        "eager": {"args": a(*packed, "--use_peft", "--lora_config.lora_dropout", "0")},
        "compiled": {"args": a(*packed, "--use_peft", "--lora_config.lora_dropout", "0", "--compile")},
        "compiled_every_k_chunked": {"args": a(*packed, "--use_peft", "--lora_config.lora_dropout", "0", "--compile",
                                               "--activation_checkpointing_policy", "every_k", *CHUNKED)},
    }


@pytest.fixture(scope="module")
def results(setting, run_fsdp_cases, request):
    a = setting["args"]
    # The slow --compile test's cases ride in this launch (one torchrun start-up, ~10 s, saved),
    # last so that no other case runs after a compilation; only when that test was selected.
    wanted = any(item.name == COMPILE_TEST for item in request.session.items)
    weights = {"record_weights": True}
    cases = {
        "plain": {"args": a(), **weights},
        "chunked": {"args": a(*CHUNKED), **weights},
        "lora_head_plain": {"args": a(*LORA_HEAD), **weights},
        "lora_head_chunked": {"args": a(*LORA_HEAD, *CHUNKED), **weights},
        "tied_plain": {"args": a(model=setting["tied"]), **weights},
        "tied_chunked": {"args": a(*CHUNKED, model=setting["tied"]), **weights},
        "vision_plain": {"args": setting["vision"](), **weights},
        "vision_chunked": {"args": setting["vision"](*CHUNKED), **weights},
        "no_checkpointing": {"args": a("--fsdp_config.fsdp_activation_checkpointing", "false")},
        "every_k": {"args": a("--activation_checkpointing_policy", "every_k", "--activation_checkpointing_every_k", "2")},
        "ops": {"args": a("--activation_checkpointing_policy", "ops")},
        "adamw_for_loop": {"args": a("--optimizer_impl", "for_loop")},
        "adamw_foreach": {"args": a("--optimizer_impl", "foreach")},
        "adamw_fused": {"args": a("--optimizer_impl", "fused")},
        **(compile_cases(a) if wanted else {}),
    }
    return run_fsdp_cases(setting["root"], cases)


def close(a: list[float], b: list[float], rtol: float = RTOL) -> bool:
    return len(a) == len(b) == 3 and all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["", "lora_head_", "tied_", "vision_"])
def test_chunked_loss_equals_plain_loss_and_trained_weights_under_fsdp(results, name):
    plain, chunked = results[f"{name}plain"], results[f"{name}chunked"]
    assert close(chunked["losses"], plain["losses"]), (chunked["losses"], plain["losses"])
    assert chunked["changed"] == plain["changed"] and plain["changed"]
    if name == "lora_head_":
        assert any("lm_head.lora_A" in n for n in plain["changed"])
    for param, value in plain["weights"].items():  # 3 AdamW steps from the same gradients
        torch.testing.assert_close(torch.tensor(chunked["weights"][param]), torch.tensor(value), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, param=param: f"{param}: {m}")


@pytest.mark.parametrize("policy", ["no_checkpointing", "every_k", "ops"])
def test_every_checkpointing_policy_gives_the_full_checkpointing_losses(results, policy):
    assert close(results[policy]["losses"], results["plain"]["losses"]), (results[policy]["losses"],
                                                                          results["plain"]["losses"])


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adamw_implementations_agree_under_fsdp(results, impl):
    """auto (the default, "plain") is fused here; foreach and the for loop round differently."""
    assert close(results[f"adamw_{impl}"]["losses"], results["adamw_for_loop"]["losses"])
    assert results["adamw_fused"]["losses"] == results["plain"]["losses"]


@pytest.mark.slow
def test_compile_with_checkpointing_and_lora_under_fsdp_gives_the_eager_losses(results):
    r = results
    for name in ("compiled", "compiled_every_k_chunked"):
        assert close(r[name]["losses"], r["eager"]["losses"]), (name, r[name]["losses"], r["eager"]["losses"])
        assert r[name]["changed"] == r["eager"]["changed"] and r["eager"]["changed"]
