"""FSDP2 with 2 real ranks (torchrun, gloo): equal losses to one process, every strategy,
activation checkpointing, offload, LoRA, freezing, precisions and low-CPU loading.

All the 2-rank runs share one torchrun launch (see fsdp_worker.py) to keep the suite fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from shardtune.finetuning import main as finetune

RTOL = 1e-4


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"numbers {i}",
             "output": f"The answer is {2 * i + 1}."} for i in range(n)]


@pytest.fixture(scope="module")
def setting(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = root / "alpaca.json"
    data.write_text(json.dumps(_rows(80)))
    common = ["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset",
              "--alpaca_dataset.data_path", str(data), "--output_dir", str(root / "out"),
              "--save_model", "False", "--num_epochs", "1", "--max_train_step", "3",
              "--lr", "1e-3", "--seed", "1", "--device", "cpu", "--context_length", "128",
              "--gradient_accumulation_steps", "2", "--gradient_clipping",
              "--gradient_clipping_threshold", "0.5"]
    return {"root": root, "common": common, "model": tiny_model_dir}


CHATML = Path(__file__).parents[1] / "data" / "chat_templates" / "chatml.jinja"


@pytest.fixture(scope="module")
def chat(setting):
    """The common flags on --dataset chat_dataset: conversations (a system message, two exchanges
    in some) rendered by the ChatML template file (the tiny tokenizer has no template of its own)."""
    rows = []
    for i in range(60):
        messages = [{"role": "user", "content": f"Add {i} and {i + 1}."},
                    {"role": "assistant", "content": f"The answer is {2 * i + 1}."}]
        if i % 3 == 0:
            messages = [{"role": "system", "content": "Be brief."}, *messages,
                        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
        rows.append({"messages": messages})
    data = setting["root"] / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = list(setting["common"])
    c[c.index("--dataset") + 1] = "chat_dataset"
    at = c.index("--alpaca_dataset.data_path")
    c[at:at + 2] = ["--chat_dataset.data_path", str(data), "--chat_dataset.chat_template", str(CHATML)]
    c[c.index("--context_length") + 1] = "256"  # the tiny tokenizer spells ChatML's markers in many tokens
    return {"common": c, "out": setting["root"] / "chat-out"}


@pytest.fixture(scope="module")
def chat_llama32(chat, llama3_chat_model_dir, setting):
    """The chat flags on the real-vocabulary tiny Llama with the real Llama 3 tokenizer and its own
    Llama 3.2 Instruct template (no template file)."""
    c = list(chat["common"])
    c[c.index("--model_name") + 1] = str(llama3_chat_model_dir)
    at = c.index("--chat_dataset.chat_template")
    del c[at:at + 2]
    return {"common": c, "out": setting["root"] / "chat-llama32-out", "model": llama3_chat_model_dir}


@pytest.fixture(scope="module")
def tied(setting, tiny_tied_model_dir):
    """The common flags on the tied-embedding tiny model (no lm_head.weight in its files)."""
    c = list(setting["common"])
    c[c.index("--model_name") + 1] = str(tiny_tied_model_dir)
    return {"common": c, "model": tiny_tied_model_dir, "out": setting["root"] / "tied-out"}


LLAMA_ADAPTER = ("--use_peft", "--peft_method", "llama_adapter", "--llama_adapter_config.adapter_layers", "2",
                 "--llama_adapter_config.adapter_len", "4")
STRATEGIES = {
    "full_shard": (),
    "shard_grad_op": ("--fsdp_config.sharding_strategy", "SHARD_GRAD_OP"),
    "no_shard": ("--fsdp_config.sharding_strategy", "NO_SHARD"),
    "hybrid": ("--fsdp_config.sharding_strategy", "HYBRID_SHARD", "--fsdp_config.sharding_group_size", "1"),
}


LORA_OPTIONS = {
    "dora": ("--lora_config.use_dora",),
    "modules_to_save": ("--lora_config.modules_to_save", "lm_head"),
    # dropout off: with rsLoRA's larger scaling on every linear layer, the ranks' dropout masks
    # (other RNG streams than one process's) would show in the losses
    "rslora_all_linear": ("--lora_config.use_rslora", "--lora_config.target_modules", "all-linear",
                          "--lora_config.lora_dropout", "0"),
}


# QLoRA on CPU: 4-bit weights stored in fp32, the dtype FSDP computes in here; dropout off (the
# ranks' dropout masks come from other RNG streams than one process's)
QLORA = ("--use_peft", "--quantization", "4bit", "--quantization_config.quant_type", "nf4",
         "--quantization_config.compute_dtype", "float32", "--quantization_config.quant_storage", "float32",
         "--lora_config.lora_dropout", "0")
QLORA_FP16 = ("--use_peft", "--quantization", "4bit", "--quantization_config.compute_dtype", "float16",
              "--quantization_config.quant_storage", "float16", "--use_fp16", "--lora_config.lora_dropout", "0")
# Two epochs, so training goes on after an evaluation (eval mode without gradients is where
# bitsandbytes repacks a 4-bit weight for CPUs; see model/quantization.keep_packed_layout).
QLORA_STEPS = ("--num_epochs", "2", "--max_train_step", "11")


# LoRA on the embeddings and the head as well (peft's lora_embedding_A/B for embed_tokens)
LORA_EMBED = ("--use_peft", "--lora_config.target_modules", "q_proj,v_proj,embed_tokens,lm_head",
              "--lora_config.lora_dropout", "0")


def _fsdp(common: list[str], *extra: str) -> list[str]:
    return [*common, "--batch_size_training", "2", "--enable_fsdp", *extra]


def _single(common: list[str], *extra: str) -> list[str]:
    return [*common, "--batch_size_training", "4", *extra]


@pytest.fixture(scope="module")
def two_rank_results(setting, tied, chat, chat_llama32, run_fsdp_cases):
    c, tc, cc = setting["common"], tied["common"], chat["common"]
    cases = {
        # the real Llama 3.2 Instruct template and vocabulary (logits of 128,256 ids not recorded)
        "chat_llama32": {"logits": False, "args": _fsdp(chat_llama32["common"], "--batching_strategy", "padding",
                                                        "--save_model", "True", "--output_dir", str(chat_llama32["out"]))},
        # --dataset chat_dataset, padded (saving the model: the template file goes out with it) and packed
        "chat": {"args": _fsdp(cc, "--batching_strategy", "padding", "--save_model", "True",
                               "--output_dir", str(chat["out"]))},
        "chat_packing": {"args": _fsdp(cc, "--batching_strategy", "packing")},
        "full_shard": {"args": _fsdp(c)},
        "no_activation_checkpointing": {"args": _fsdp(c, "--fsdp_config.fsdp_activation_checkpointing", "False")},
        "shard_grad_op": {"args": _fsdp(c, "--fsdp_config.sharding_strategy", "SHARD_GRAD_OP")},
        "no_shard": {"args": _fsdp(c, "--fsdp_config.sharding_strategy", "NO_SHARD")},
        "hybrid_1x2": {"args": _fsdp(c, "--fsdp_config.sharding_strategy", "HYBRID_SHARD", "--fsdp_config.hsdp",
                                     "--fsdp_config.sharding_group_size", "2", "--fsdp_config.replica_group_size", "1")},
        "hybrid_2x1": {"args": _fsdp(c, "--fsdp_config.sharding_strategy", "HYBRID_SHARD",
                                     "--fsdp_config.sharding_group_size", "1", "--fsdp_config.replica_group_size", "2")},
        "cpu_offload": {"args": _fsdp(c, "--fsdp_config.fsdp_cpu_offload")},
        # gradient accumulation's other reduction schedule for each kind of run (auto picks
        # every_micro_batch for full-parameter training and last_micro_batch for adapters)
        "full_shard_sync_last": {"args": _fsdp(c, "--fsdp_config.gradient_sync", "last_micro_batch")},
        "lora_sync_every": {"args": _fsdp(c, "--use_peft", "--fsdp_config.gradient_sync", "every_micro_batch")},
        "packing": {"args": _fsdp(c, "--batching_strategy", "packing")},
        # offload with everything that runs collectives on host tensors: clipping (in common),
        # the fp16 scaler's inf check and the HF export's gathers
        "cpu_offload_fp16_export": {"args": _fsdp(c, "--fsdp_config.fsdp_cpu_offload", "--use_fp16", "--save_model", "True",
                                                  "--output_dir", str(setting["root"] / "offload-out"))},
        "lora": {"args": _fsdp(c, "--use_peft", "--peft_method", "lora", "--save_model", "True", "--merge_lora",
                               "--output_dir", str(setting["root"] / "lora-out"))},
        "save_full": {"args": _fsdp(c, "--save_model", "True", "--output_dir", str(setting["root"] / "full-out"))},
        # QLoRA step checkpoint and exact resume (the adapter and its optimizer state are in the
        # checkpoint; the 4-bit base and its quant state come from --model_name)
        "qlora_uninterrupted": {"args": _fsdp(c, *QLORA, "--max_train_step", "6")},
        "qlora_first_part": {"args": _fsdp(c, *QLORA, "--save_every_n_steps", "3",
                                           "--output_dir", str(setting["root"] / "qlora-resume"))},
        "qlora_resumed": {"args": _fsdp(c, *QLORA, "--max_train_step", "6", "--save_every_n_steps", "3", "--resume",
                                        "--output_dir", str(setting["root"] / "qlora-resume"))},
        # QLoRA with --low_cpu_fsdp: each rank quantizes the checkpoint tensor by tensor and keeps its rows
        **{f"qlora_low_cpu_{name}": {"args": _fsdp(c, *QLORA, *QLORA_STEPS, *STRATEGIES[name], "--low_cpu_fsdp",
                                                  "--save_model", "True",
                                                  "--output_dir", str(setting["root"] / f"qlora-low-cpu-{name}"))}
           for name in ("full_shard", "hybrid")},
        # fp16 QLoRA: the 4-bit weights stored in float16, the dtype FSDP casts everything to
        "qlora_fp16": {"args": _fsdp(c, *QLORA_FP16)},
        "lora_embed": {"args": _fsdp(c, *LORA_EMBED, "--save_model", "True", "--merge_lora",
                                     "--output_dir", str(setting["root"] / "lora-embed-out"))},
        "lora_embed_low_cpu": {"args": _fsdp(c, *LORA_EMBED, "--low_cpu_fsdp")},
        # modules_to_save copies of every norm (inside the sharded decoder layers and at the root)
        "lora_embed_saved_norms": {"args": _fsdp(c, *LORA_EMBED, "--lora_config.modules_to_save", "norm",
                                                 "--save_model", "True", "--merge_lora",
                                                 "--output_dir", str(setting["root"] / "lora-saved-norms-out"))},
        **{f"qlora_{name}": {"args": _fsdp(c, *QLORA, *QLORA_STEPS, *flags, "--save_model", "True", "--merge_lora",
                                           "--output_dir", str(setting["root"] / f"qlora-{name}"))}
           for name, flags in STRATEGIES.items()},
        "freeze_layers": {"args": _fsdp(c, "--freeze_layers", "--num_freeze_layers", "1")},
        "pure_bf16_anyprecision": {"args": _fsdp(c, "--fsdp_config.pure_bf16", "--fsdp_config.optimizer", "anyprecision")},
        "fp16": {"args": _fsdp(c, "--use_fp16")},
        "logits_normal": {"kind": "logits", "args": _fsdp(c)},
        "logits_low_cpu": {"kind": "logits", "args": _fsdp(c, "--low_cpu_fsdp")},
        "logits_low_cpu_hybrid": {"kind": "logits", "args": _fsdp(c, "--low_cpu_fsdp", "--fsdp_config.sharding_strategy", "HYBRID_SHARD",
                                                                 "--fsdp_config.sharding_group_size", "1")},
        "logits_low_cpu_lora": {"kind": "logits", "args": _fsdp(c, "--low_cpu_fsdp", "--use_peft")},
        **{f"llama_adapter_{name}": {"args": _fsdp(c, *LLAMA_ADAPTER, *flags)} for name, flags in STRATEGIES.items()},
        **{f"lora_{name}": {"args": _fsdp(c, "--use_peft", *flags)} for name, flags in LORA_OPTIONS.items()},
        "adapter_normal": {"kind": "adapter", "args": _fsdp(c, "--use_peft")},
        "adapter_low_cpu": {"kind": "adapter", "args": _fsdp(c, "--use_peft", "--low_cpu_fsdp")},
        "adapter_low_cpu_no_shard": {"kind": "adapter", "args": _fsdp(c, "--use_peft", "--low_cpu_fsdp",
                                                                      "--fsdp_config.sharding_strategy", "NO_SHARD")},
        "llama_adapter_weights_normal": {"kind": "adapter", "args": _fsdp(c, *LLAMA_ADAPTER)},
        "llama_adapter_weights_low_cpu": {"kind": "adapter", "args": _fsdp(c, *LLAMA_ADAPTER, "--low_cpu_fsdp")},
        "llama_adapter_low_cpu": {"args": _fsdp(c, *LLAMA_ADAPTER, "--low_cpu_fsdp")},
        # continuing the adapter the "lora" case saved (it runs earlier in the same launch)
        "from_adapter_normal": {"kind": "adapter", "args": _fsdp(c, "--use_peft", "--from_peft_checkpoint",
                                                                 str(setting["root"] / "lora-out"))},
        "from_adapter_low_cpu": {"kind": "adapter", "args": _fsdp(c, "--use_peft", "--low_cpu_fsdp", "--from_peft_checkpoint",
                                                                  str(setting["root"] / "lora-out"))},
        # Tied input/output embeddings (Llama 3.2 1B/3B): every loading path and strategy.
        "tied_logits_normal": {"kind": "logits", "args": _fsdp(tc)},
        "tied_logits_low_cpu": {"kind": "logits", "args": _fsdp(tc, "--low_cpu_fsdp")},
        "tied_logits_low_cpu_hybrid": {"kind": "logits", "args": _fsdp(tc, "--low_cpu_fsdp", "--fsdp_config.sharding_strategy",
                                                                       "HYBRID_SHARD", "--fsdp_config.sharding_group_size", "1")},
        "tied_logits_low_cpu_lora": {"kind": "logits", "args": _fsdp(tc, "--low_cpu_fsdp", "--use_peft")},
        "tied_train_normal": {"args": _fsdp(tc)},
        "tied_train_low_cpu_save": {"args": _fsdp(tc, "--low_cpu_fsdp", "--save_model", "True",
                                                  "--output_dir", str(tied["out"]))},
        "tied_train_no_shard": {"args": _fsdp(tc, "--low_cpu_fsdp", "--fsdp_config.sharding_strategy", "NO_SHARD")},
        "tied_train_low_cpu_lora": {"args": _fsdp(tc, "--low_cpu_fsdp", "--use_peft")},
    }
    return run_fsdp_cases(setting["root"], cases)


def _close(a: list[float], b: list[float], rtol: float = RTOL) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def single_process(setting, chat, chat_llama32):
    c, cc = setting["common"], chat["common"]
    return {
        "chat_llama32": finetune(_single(chat_llama32["common"], "--batching_strategy", "padding"))["train_step_loss"],
        "chat": finetune(_single(cc, "--batching_strategy", "padding"))["train_step_loss"],
        "chat_packing": finetune(_single(cc, "--batching_strategy", "packing"))["train_step_loss"],
        "full": finetune(_single(c))["train_step_loss"],
        "packing": finetune(_single(c, "--batching_strategy", "packing"))["train_step_loss"],
        "lora": finetune(_single(c, "--use_peft", "--peft_method", "lora"))["train_step_loss"],
        "qlora": finetune(_single(c, *QLORA, *QLORA_STEPS)),
        "qlora_fp16": finetune(_single(c, *QLORA_FP16))["train_step_loss"],
        "lora_embed": finetune(_single(c, *LORA_EMBED))["train_step_loss"],
        "llama_adapter": finetune(_single(c, *LLAMA_ADAPTER))["train_step_loss"],
        **{f"lora_{name}": finetune(_single(c, "--use_peft", *flags))["train_step_loss"]
           for name, flags in LORA_OPTIONS.items()},
    }


@pytest.fixture(scope="module")
def tied_single_process(tied):
    return finetune(_single(tied["common"]))["train_step_loss"]


@pytest.fixture(scope="module")
def tied_lora_single_process(tied):
    return finetune(_single(tied["common"], "--use_peft"))["train_step_loss"]


def test_two_ranks_equal_one_process_on_the_same_global_batch(two_rank_results, single_process):
    fsdp = two_rank_results["full_shard"]["losses"]
    assert len(fsdp) == 3
    assert _close(fsdp, single_process["full"]), (fsdp, single_process["full"])


def test_packing_under_fsdp_equals_one_process(two_rank_results, single_process):
    assert _close(two_rank_results["packing"]["losses"], single_process["packing"])


@pytest.mark.parametrize("case", ["chat", "chat_packing", "chat_llama32"])
def test_chat_dataset_under_fsdp_equals_one_process(two_rank_results, single_process, case):
    """--dataset chat_dataset, padded and packed: 2 ranks give one process's losses."""
    fsdp = two_rank_results[case]["losses"]
    assert len(fsdp) == 3 and _close(fsdp, single_process[case]), (fsdp, single_process[case])


def test_chat_dataset_template_file_goes_out_with_the_model(two_rank_results, chat, chat_llama32):
    """--chat_dataset.chat_template is the template the saved model's tokenizer carries."""
    from transformers import AutoTokenizer

    assert two_rank_results["chat"]["losses"]
    assert AutoTokenizer.from_pretrained(chat["out"]).chat_template == CHATML.read_text()
    # without a template file, the model's own template goes out unchanged
    own = (chat_llama32["model"] / "chat_template.jinja").read_text()
    assert AutoTokenizer.from_pretrained(chat_llama32["out"]).chat_template == own


@pytest.mark.parametrize("case", ["no_activation_checkpointing", "shard_grad_op", "no_shard",
                                  "hybrid_1x2", "hybrid_2x1", "cpu_offload"])
def test_every_strategy_gives_the_full_shard_losses(two_rank_results, case):
    assert _close(two_rank_results[case]["losses"], two_rank_results["full_shard"]["losses"]), case


def test_lora_under_fsdp_trains_only_adapters_and_matches_one_process(two_rank_results, single_process):
    r = two_rank_results["lora"]
    assert r["changed"] and all("lora_" in n for n in r["changed"])
    assert set(r["changed"]) == set(r["trainable"])
    assert r["optimizer_tensors"] == len(r["trainable"]) < len(r["all_params"])
    assert _close(r["losses"], single_process["lora"])


@pytest.mark.parametrize("case, reference", [("full_shard_sync_last", "full"), ("lora_sync_every", "lora")])
def test_either_gradient_sync_schedule_matches_one_process(two_rank_results, single_process, case, reference):
    assert _close(two_rank_results[case]["losses"], single_process[reference]), case


@pytest.mark.parametrize("case, second_micro_batch", [
    ("full_shard", [True, False]),  # auto, full-parameter: reduce-scattered into the sharded gradients
    ("full_shard_sync_last", [False, False]),  # nothing reduced before the last micro-batch
    ("hybrid_2x1", [False, True]),  # reduce-scattered, the all-reduce across replicas held for the last
    ("lora", [False, False]),  # auto, adapters: once per step
])
def test_gradients_between_micro_batches_follow_the_schedule(two_rank_results, case, second_micro_batch):
    """[sharded .grad present, FSDP's not-yet-all-reduced sum present] as each micro-batch of a step
    (accumulation 2) starts: nothing before the first, the schedule's state before the second."""
    held = two_rank_results[case]["gradients_held"]
    assert held[0::2] == [[False, False]] * 3 and held[1::2] == [second_micro_batch] * 3, held


@pytest.mark.parametrize("option", list(LORA_OPTIONS))
def test_lora_options_under_fsdp_match_one_process(two_rank_results, single_process, option):
    r = two_rank_results[f"lora_{option}"]
    assert r["changed"] and set(r["changed"]) <= set(r["trainable"])
    assert all(".lora_" in n or ".modules_to_save." in n for n in r["trainable"])
    assert _close(r["losses"], single_process[f"lora_{option}"]), (r["losses"], single_process[f"lora_{option}"])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_llama_adapter_under_every_strategy_matches_one_process(two_rank_results, single_process, strategy):
    r = two_rank_results[f"llama_adapter_{strategy}"]
    assert r["changed"] and all("adaption_" in n for n in r["changed"])  # only the adapter trains
    assert _close(r["losses"], single_process["llama_adapter"]), (r["losses"], single_process["llama_adapter"])


def test_qlora_step_checkpoint_resumes_exactly_and_converts_to_the_adapter(two_rank_results, setting, tmp_path):
    from safetensors.torch import load_file

    from shardtune.convert.core import convert

    full, first, resumed = (two_rank_results[k]["losses"] for k in ("qlora_uninterrupted", "qlora_first_part",
                                                                    "qlora_resumed"))
    assert len(full) == 6 and _close(first, full[:3]) and _close(resumed, full[3:]), (full, first, resumed)
    ckpt = setting["root"] / "qlora-resume" / "checkpoints" / "fine-tuned" / "step-000006"
    # what the checkpoint holds of the model: the adapter only, never the frozen 4-bit base (its
    # weights and their bitsandbytes quant state come from --model_name again on resume)
    from torch.distributed.checkpoint import FileSystemReader

    model_keys = [k.removeprefix("model.") for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
                  if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys
    summary = convert(ckpt, tmp_path / "adapter")
    assert summary["adapter"]
    assert all(".lora_" in k for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))


@pytest.mark.parametrize("strategy", ["full_shard", "hybrid"])
def test_qlora_with_low_cpu_loading_equals_the_normal_load(two_rank_results, setting, strategy):
    """--low_cpu_fsdp with a 4-bit base: each rank quantizes the checkpoint's tensors one at a time
    and keeps its rows of the packed bytes. The training is the normal load's to the last bit
    (same 4-bit bytes, same quant state, same seeded adapter)."""
    from safetensors.torch import load_file

    low, normal = two_rank_results[f"qlora_low_cpu_{strategy}"], two_rank_results[f"qlora_{strategy}"]
    assert low["losses"] == normal["losses"], (low["losses"], normal["losses"])
    assert low["changed"] and all(".lora_" in n for n in low["changed"])
    saved = [load_file(str(setting["root"] / d / "adapter_model.safetensors"))
             for d in (f"qlora-low-cpu-{strategy}", f"qlora-{strategy}")]
    assert saved[0].keys() == saved[1].keys() and saved[0]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_qlora_in_fp16_under_fsdp_matches_one_process(two_rank_results, single_process):
    """fp16 QLoRA: the 4-bit bytes stored in float16 pass FSDP's float16 casts unchanged, the base
    stays bit-identical, and the losses equal one process's autocast run within fp32 tolerance."""
    r = two_rank_results["qlora_fp16"]
    assert r["changed"] and all(".lora_" in n for n in r["changed"])
    assert all(math.isfinite(x) for x in r["losses"])
    assert _close(r["losses"], single_process["qlora_fp16"]), (r["losses"], single_process["qlora_fp16"])


def test_lora_on_embeddings_and_head_under_fsdp_and_low_cpu_matches_one_process_and_merges(
        two_rank_results, single_process, setting):
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = two_rank_results["lora_embed"]
    assert any("embed_tokens.lora_embedding_A" in n for n in r["trainable"])
    assert any("lm_head.lora_A" in n for n in r["trainable"])
    assert set(r["changed"]) == set(r["trainable"])
    assert _close(r["losses"], single_process["lora_embed"]), (r["losses"], single_process["lora_embed"])
    assert _close(two_rank_results["lora_embed_low_cpu"]["losses"], single_process["lora_embed"])
    out = setting["root"] / "lora-embed-out"
    tok = AutoTokenizer.from_pretrained(setting["model"])
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])  # fsdp_worker.PROBE
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setting["model"]), str(out)).eval()
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        # the saved adapter is the trained one, and the merge drops no layer
        torch.testing.assert_close(adapted(ids).logits, torch.tensor(r["logits"]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)


def test_fsdp_modules_to_save_adapter_is_saved_and_merged(two_rank_results, setting):
    """modules_to_save copies under FSDP next to a LoRA on the embeddings and the head: the 2-rank
    adapter holds them (its save used to fail with a KeyError), gives the trained logits, and the
    --merge_lora model gives the adapter model's."""
    import warnings

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = two_rank_results["lora_embed_saved_norms"]
    assert any(".modules_to_save." in n for n in r["changed"])
    out = setting["root"] / "lora-saved-norms-out"
    assert any(k.endswith("model.norm.weight") for k in load_file(str(out / "adapter_model.safetensors")))
    tok = AutoTokenizer.from_pretrained(setting["model"])
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])  # fsdp_worker.PROBE
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setting["model"]), str(out)).eval()
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(adapted(ids).logits, torch.tensor(r["logits"]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_qlora_under_every_strategy_matches_one_process(two_rank_results, single_process, strategy, setting):
    """QLoRA under FSDP2: 4-bit base weights (stored in the compute dtype) sharded and gathered
    intact, LoRA trained as in one process, evaluation (eval mode, no grad: where bitsandbytes
    would repack the gathered weight for CPUs) equal, and the adapter loads on the plain base."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r, one = two_rank_results[f"qlora_{strategy}"], single_process["qlora"]
    assert len(r["losses"]) == 11  # 9 steps, an evaluation, 2 more steps
    assert r["changed"] and all(".lora_" in n for n in r["changed"])  # the 4-bit base is bit-identical
    assert _close(r["losses"], one["train_step_loss"]), (r["losses"], one["train_step_loss"])
    assert math.isclose(r["eval_loss"], one["best_eval_loss"], rel_tol=RTOL), (r["eval_loss"], one["best_eval_loss"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(setting["model"], dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, str(setting["root"] / f"qlora-{strategy}")).eval()
        merged = AutoModelForCausalLM.from_pretrained(setting["root"] / f"qlora-{strategy}" / "merged").eval()
    assert any(".lora_B" in n and p.abs().sum() > 0 for n, p in adapted.named_parameters())
    ids = torch.tensor([[1, 17, 42, 99, 5, 230, 7]])
    with torch.no_grad():  # --merge_lora: onto the plain base, as peft applies the adapter there
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
    # the saved adapter is the trained one: on the 4-bit base (same kernel) it gives the trained logits
    from transformers import AutoTokenizer

    from shardtune.config import parse_args
    from shardtune.model.loading import load_model
    from shardtune.model.quantization import bnb_config, keep_packed_layout

    q = parse_args(list(QLORA)).config.quantization
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        quantized = load_model(str(setting["model"]), dtype=torch.float32, attn="sdpa", quantization=bnb_config("4bit", q))
        keep_packed_layout(quantized)
        on_4bit = PeftModel.from_pretrained(quantized, str(setting["root"] / f"qlora-{strategy}")).eval()
        probe = torch.tensor([AutoTokenizer.from_pretrained(setting["model"]).encode(
            "The quick brown fox jumps over the lazy dog.")])  # fsdp_worker.PROBE
        torch.testing.assert_close(on_4bit(probe).logits, torch.tensor(r["logits"]), rtol=1e-4, atol=1e-4)


def test_freeze_layers_freezes_exactly_the_first_layers(two_rank_results):
    r = two_rank_results["freeze_layers"]
    frozen = [n for n in r["all_params"] if n.startswith("model.layers.0.")]
    assert frozen and not set(frozen) & set(r["changed"])
    assert set(r["changed"]) == set(n for n in r["all_params"] if n not in frozen)
    assert r["optimizer_tensors"] == len(r["all_params"]) - len(frozen)


def test_pure_bf16_with_anyprecision_keeps_bf16_weights_and_trains(two_rank_results):
    r = two_rank_results["pure_bf16_anyprecision"]
    assert r["param_dtypes"] == ["torch.bfloat16"]
    assert all(math.isfinite(x) for x in r["losses"]) and r["changed"]
    # bf16 compute stays close to the fp32 run on a tiny model
    assert _close(r["losses"][:1], two_rank_results["full_shard"]["losses"][:1], rtol=2e-2)


def test_fp16_mixed_precision_trains_with_a_sharded_grad_scaler(two_rank_results):
    r = two_rank_results["fp16"]
    assert r["param_dtypes"] == ["torch.float32"]  # fp32 master weights, fp16 compute
    assert all(math.isfinite(x) for x in r["losses"])
    assert _close(r["losses"][:1], two_rank_results["full_shard"]["losses"][:1], rtol=1e-2)


@pytest.mark.parametrize("case", ["logits_low_cpu", "logits_low_cpu_hybrid", "logits_low_cpu_lora"])
def test_low_cpu_loading_gives_identical_logits(two_rank_results, case):
    normal = torch.tensor(two_rank_results["logits_normal"]["logits"])
    low = torch.tensor(two_rank_results[case]["logits"])
    torch.testing.assert_close(low, normal, rtol=0, atol=1e-5)


def _probe_logits(model, model_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_fsdp_saved_model_loads_in_transformers_with_the_trained_logits(two_rank_results, setting):
    from transformers import AutoModelForCausalLM

    out = setting["root"] / "full-out"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = torch.tensor(two_rank_results["save_full"]["logits"])
    torch.testing.assert_close(_probe_logits(model, out), trained, rtol=0, atol=1e-5)


def test_cpu_offload_with_fp16_clipping_and_export(two_rank_results, setting):
    from transformers import AutoModelForCausalLM

    r = two_rank_results["cpu_offload_fp16_export"]
    assert all(math.isfinite(x) for x in r["losses"]) and r["changed"]
    assert _close(r["losses"][:1], two_rank_results["fp16"]["losses"][:1], rtol=1e-4)
    out = setting["root"] / "offload-out"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    # the worker's logits ran with FSDP's fp16 compute, the reload computes in fp32
    torch.testing.assert_close(_probe_logits(model, out), torch.tensor(r["logits"]), rtol=0, atol=2e-3)


def test_fsdp_saved_lora_adapter_loads_in_peft_with_the_trained_logits(two_rank_results, setting):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = setting["root"] / "lora-out"
    assert (out / "adapter_config.json").is_file() and not list(out.glob("model*.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(setting["model"])
    model = PeftModel.from_pretrained(base, out).eval()
    trained = torch.tensor(two_rank_results["lora"]["logits"])
    torch.testing.assert_close(_probe_logits(model, setting["model"]), trained, rtol=0, atol=1e-5)


def test_fsdp_merged_lora_export_loads_as_a_plain_model_with_the_trained_logits(two_rank_results, setting):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(setting["root"] / "lora-out" / "merged").eval()
    trained = torch.tensor(two_rank_results["lora"]["logits"])
    torch.testing.assert_close(_probe_logits(merged, setting["model"]), trained, rtol=1e-4, atol=1e-4)


# --- new LoRA weights under --low_cpu_fsdp (each rank used to draw the same rows) ---

def test_low_cpu_lora_starts_from_the_same_adapter_as_normal_loading(two_rank_results):
    normal, low = two_rank_results["adapter_normal"], two_rank_results["adapter_low_cpu"]
    assert normal and set(low) == set(normal)
    for name, value in normal.items():
        torch.testing.assert_close(torch.tensor(low[name]), torch.tensor(value), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(torch.tensor(two_rank_results["adapter_low_cpu_no_shard"][name]),
                                   torch.tensor(value), rtol=0, atol=0, msg=name)
    lora_a = [torch.tensor(v) for n, v in low.items() if ".lora_A." in n]
    assert lora_a and all(a.abs().sum() > 0 for a in lora_a)
    for a in lora_a:  # the two ranks' row blocks differ (the bug made them equal)
        half = a.shape[0] // 2
        assert not torch.equal(a[:half], a[half:2 * half])


def test_low_cpu_llama_adapter_starts_like_normal_loading_and_trains_like_one_process(two_rank_results,
                                                                                    single_process):
    normal, low = two_rank_results["llama_adapter_weights_normal"], two_rank_results["llama_adapter_weights_low_cpu"]
    assert normal and set(low) == set(normal) and all(".adaption_" in n for n in normal)
    for name, value in normal.items():
        torch.testing.assert_close(torch.tensor(low[name]), torch.tensor(value), rtol=0, atol=0, msg=name)
    assert _close(two_rank_results["llama_adapter_low_cpu"]["losses"], single_process["llama_adapter"])


def test_from_peft_checkpoint_loads_the_saved_adapter_with_and_without_low_cpu(two_rank_results, setting):
    from safetensors.torch import load_file

    saved = load_file(str(setting["root"] / "lora-out" / "adapter_model.safetensors"))
    normal, low = two_rank_results["from_adapter_normal"], two_rank_results["from_adapter_low_cpu"]
    assert normal and set(low) == set(normal) and len(saved) == len(normal)
    for name, value in normal.items():
        expected = saved[name.replace(".default", "")]
        torch.testing.assert_close(torch.tensor(value), expected, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(torch.tensor(low[name]), expected, rtol=0, atol=0, msg=name)
    assert any(".lora_B." in n and saved[n.replace(".default", "")].abs().sum() > 0 for n in normal)  # trained


def test_new_lora_weights_depend_only_on_seed_and_name(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shardtune.model.adapter_init import initialise_adapter

    def adapter(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1000 + seed)  # the global RNG must not matter
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        initialise_adapter(model, seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}

    a, b, other = adapter(7), adapter(7), adapter(8)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    a_weights = [n for n in a if ".lora_A." in n]
    assert all(not torch.equal(a[n], other[n]) for n in a_weights)
    assert all(a[n].abs().max() <= 1 / math.sqrt(a[n].shape[1]) for n in a_weights)  # peft's kaiming bound
    assert all(not a[n].any() for n in a if ".lora_B." in n)


# --- tied input/output embeddings ---

@pytest.mark.parametrize("case", ["tied_logits_low_cpu", "tied_logits_low_cpu_hybrid", "tied_logits_low_cpu_lora"])
def test_tied_model_loads_tied_on_every_path(two_rank_results, case):
    normal = two_rank_results["tied_logits_normal"]
    assert normal["tied"] and two_rank_results[case]["tied"]
    torch.testing.assert_close(torch.tensor(two_rank_results[case]["logits"]), torch.tensor(normal["logits"]),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["tied_train_low_cpu_save", "tied_train_no_shard"])
def test_tied_model_trains_tied_and_equals_one_process(two_rank_results, tied_single_process, case):
    r = two_rank_results[case]
    assert r["tied"] and "lm_head.weight" not in r["all_params"]
    assert _close(r["losses"], two_rank_results["tied_train_normal"]["losses"])
    assert _close(r["losses"], tied_single_process)


def test_lora_keeps_the_frozen_tied_embedding_whole_and_equals_one_process(two_rank_results,
                                                                          tied_lora_single_process):
    """The frozen tied embedding/head of a LoRA run is held whole on every rank (no all-gather of it
    in any step: parallel/fsdp.py), everything else stays sharded, and the losses are one process's."""
    r = two_rank_results["tied_train_low_cpu_lora"]
    assert r["tied"] and r["unsharded"] == ["base_model.model.model.embed_tokens.weight",
                                            "base_model.model.model.norm.weight"], r["unsharded"]
    assert r["changed"] and all(".lora_" in n for n in r["changed"])
    assert _close(r["losses"], tied_lora_single_process), (r["losses"], tied_lora_single_process)


def test_tied_model_export_and_conversion_keep_the_tie_and_the_logits(two_rank_results, tied, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from shardtune.convert import convert

    trained = torch.tensor(two_rank_results["tied_train_low_cpu_save"]["logits"])
    converted = tmp_path / "converted"
    convert(tied["out"] / "checkpoints" / "fine-tuned", converted)
    for out in (tied["out"], converted):
        files = list(out.glob("*.safetensors"))
        keys = {k for f in files for k in safe_open(str(f), "pt").keys()}
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
        torch.testing.assert_close(_probe_logits(model, tied["model"]), trained, rtol=0, atol=1e-5)
