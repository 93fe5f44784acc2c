"""--use_dpo through the real recipe: the first step's loss (ln 2 for sigmoid, 1/(4 beta^2) for IPO) for
full-parameter, LoRA and LLaMA-Adapter runs, learning a toy preference, the reward figures in
metrics.json, 2 FSDP ranks equal to one process for every sharding strategy, and exact resume.

QLoRA (4-bit base, bitsandbytes on CPU) on 2 ranks with both losses, its reference being the
quantized base with the adapter off. All the 2-rank runs share one torchrun launch (fsdp_worker.py)."""

from __future__ import annotations

import json
import math

import pytest

from shardtune.finetuning import main as finetune

RTOL = 1e-4
LN2 = math.log(2)
LORA = ("--use_peft", "--peft_method", "lora", "--lora_config.lora_dropout", "0")
LLAMA_ADAPTER = ("--use_peft", "--peft_method", "llama_adapter", "--llama_adapter_config.adapter_layers", "2",
                 "--llama_adapter_config.adapter_len", "4")
IPO = ("--dpo_config.loss_type", "ipo", "--dpo_config.beta", "0.5")
# QLoRA on CPU (bitsandbytes' 4-bit layers), as tests/parallel/test_fsdp.py: nf4 weights stored in fp32
QLORA = ("--use_peft", "--quantization", "4bit", "--quantization_config.quant_type", "nf4",
         "--quantization_config.compute_dtype", "float32", "--quantization_config.quant_storage", "float32",
         "--lora_config.lora_dropout", "0")
STRATEGIES = {
    "full_shard": (),
    "shard_grad_op": ("--fsdp_config.sharding_strategy", "SHARD_GRAD_OP"),
    "no_shard": ("--fsdp_config.sharding_strategy", "NO_SHARD"),
    "hybrid": ("--fsdp_config.sharding_strategy", "HYBRID_SHARD", "--fsdp_config.sharding_group_size", "1"),
}


def _pairs(n: int) -> list[dict]:
    """A learnable preference: the right sum over a wrong one."""
    return [{"prompt": f"What is {i % 9} plus {i % 7}?", "chosen": f"It is {i % 9 + i % 7}.",
             "rejected": f"Maybe {(i % 9) * (i % 7) + 11}, who knows."} for i in range(n)]


@pytest.fixture(scope="module")
def setting(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    data = root / "pairs.json"
    data.write_text(json.dumps(_pairs(42)))  # 2 held out (--eval_fraction 0.05), 40 train
    common = ["--model_name", str(tiny_model_dir), "--dataset", "preference_dataset", "--use_dpo",
              "--preference_dataset.data_path", str(data), "--batching_strategy", "padding",
              "--output_dir", str(root / "out"), "--save_model", "False", "--num_epochs", "1",
              "--max_train_step", "3", "--lr", "3e-3", "--seed", "1", "--device", "cpu", "--context_length", "64",
              "--gradient_accumulation_steps", "2", "--val_batch_size", "1"]
    return {"root": root, "common": common}


def _fsdp(common: list[str], *extra: str) -> list[str]:
    return [*common, "--batch_size_training", "2", "--enable_fsdp", *extra]


def _single(common: list[str], *extra: str) -> list[str]:
    return [*common, "--batch_size_training", "4", *extra]


def _close(a: list[float], b: list[float], rtol: float = RTOL) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def single_process(setting):
    c, root = setting["common"], setting["root"]
    full = finetune(_single(c, "--save_metrics", "--output_dir", str(root / "single-full")))
    return {
        "full": full,
        "metrics": json.loads((root / "single-full" / "metrics.json").read_text()),
        "lora": finetune(_single(c, *LORA)),
        "llama_adapter": finetune(_single(c, *LLAMA_ADAPTER)),
        "ipo": finetune(_single(c, *IPO)),
        "precompute": finetune(_single(c, "--dpo_config.precompute_reference")),
        "lora_precompute": finetune(_single(c, *LORA, "--dpo_config.precompute_reference")),
    }


@pytest.fixture(scope="module")
def two_ranks(setting, run_fsdp_cases):
    c, root = setting["common"], setting["root"]
    cases = {**{name: {"args": _fsdp(c, *flags), "logits": False} for name, flags in STRATEGIES.items()},
             "lora": {"args": _fsdp(c, *LORA), "logits": False},
             "llama_adapter": {"args": _fsdp(c, *LLAMA_ADAPTER), "logits": False},
             "ipo": {"args": _fsdp(c, *IPO), "logits": False},
             "precompute": {"args": _fsdp(c, "--dpo_config.precompute_reference"), "logits": False},
             "qlora": {"args": _fsdp(c, *QLORA, "--save_model", "True", "--save_metrics",
                                     "--output_dir", str(root / "qlora")), "logits": False},
             "qlora_ipo": {"args": _fsdp(c, *QLORA, *IPO), "logits": False}}
    # exact resume: a checkpoint at step 2 of 3, then --resume does step 3 (full: the frozen reference
    # copy is built again from --model_name; LoRA: the reference is the base, with the adapter off)
    # precompute: --resume reads <output_dir>/dpo_reference_logps.json back (train/reference_store.py)
    for kind, flags in (("full", ()), ("lora", LORA), ("precompute", ("--dpo_config.precompute_reference",))):
        out = str(root / f"resume-{kind}")
        cases[f"{kind}_first_part"] = {"args": _fsdp(c, *flags, "--output_dir", out, "--save_every_n_steps", "1",
                                                     "--max_train_step", "2"), "logits": False}
        cases[f"{kind}_resumed"] = {"args": _fsdp(c, *flags, "--output_dir", out, "--save_every_n_steps", "1",
                                                  "--resume"), "logits": False}
    return run_fsdp_cases(root, cases)


@pytest.mark.parametrize("kind", ["full", "lora", "llama_adapter"])
def test_first_step_sigmoid_loss_is_ln2_because_the_policy_is_the_reference(single_process, two_ranks, kind):
    assert math.isclose(single_process[kind]["train_step_loss"][0], LN2, rel_tol=1e-6)
    rank_case = "full_shard" if kind == "full" else kind
    assert math.isclose(two_ranks[rank_case]["losses"][0], LN2, rel_tol=1e-6)


def test_first_step_ipo_loss_is_one_over_four_beta_squared(single_process, two_ranks):
    assert math.isclose(single_process["ipo"]["train_step_loss"][0], 1.0, rel_tol=1e-6)  # beta 0.5
    assert math.isclose(two_ranks["ipo"]["losses"][0], 1.0, rel_tol=1e-6)


def test_a_toy_preference_is_learned_and_its_figures_are_in_metrics_json(single_process):
    m = single_process["metrics"]
    losses, accuracy = m["train_step_loss"], m["train_step_reward_accuracy"]
    assert losses[0] == pytest.approx(LN2) and losses[-1] < 0.8 * losses[0], losses
    assert accuracy[0] == 0.0 and accuracy[-1] > 0.5, accuracy  # ties at step 1 count as wrong
    margins = m["train_step_reward_margin"]
    assert margins[0] == 0.0 and margins[-1] > 0
    for i in range(len(losses)):
        assert margins[i] == pytest.approx(m["train_step_rewards_chosen"][i] - m["train_step_rewards_rejected"][i])
    assert len(m["val_reward_accuracy"]) == 1 and m["val_epoch_loss"][0] < LN2  # the 2 held-out pairs
    for name in ("rewards_chosen", "rewards_rejected", "reward_margin"):
        assert len(m[f"val_{name}"]) == 1


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_ranks_equal_one_process_for_every_strategy(single_process, two_ranks, strategy):
    assert _close(two_ranks[strategy]["losses"], single_process["full"]["train_step_loss"])
    # the eval loss is a mean over pairs: 1 pair per rank equals 2 pairs in one process
    assert math.isclose(two_ranks[strategy]["eval_loss"], single_process["full"]["best_eval_loss"], rel_tol=RTOL)


@pytest.mark.parametrize("kind", ["lora", "llama_adapter", "ipo"])
def test_two_ranks_equal_one_process_for_adapters_and_ipo(single_process, two_ranks, kind):
    assert _close(two_ranks[kind]["losses"], single_process[kind]["train_step_loss"])


def test_an_adapter_run_trains_only_the_adapter(two_ranks):
    lora = two_ranks["lora"]
    assert lora["changed"] and all("lora_" in n for n in lora["changed"])


@pytest.mark.parametrize("kind", ["full", "lora", "precompute"])
def test_resumed_dpo_run_continues_with_the_uninterrupted_losses(two_ranks, kind):
    whole = two_ranks["full_shard" if kind == "full" else kind]["losses"]
    first, resumed = two_ranks[f"{kind}_first_part"]["losses"], two_ranks[f"{kind}_resumed"]["losses"]
    assert _close(first, whole[:2]) and _close(resumed, whole[2:], rtol=1e-5), (first, resumed, whole)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_precomputed_reference_gives_the_same_run(single_process, kind):
    """Reference log-probabilities computed once before training (no frozen copy for a full run) give
    the losses and eval loss of the run that runs the reference every step."""
    pre, live = single_process["precompute" if kind == "full" else "lora_precompute"], single_process[kind]
    assert _close(pre["train_step_loss"], live["train_step_loss"], rtol=1e-5)
    assert math.isclose(pre["best_eval_loss"], live["best_eval_loss"], rel_tol=1e-5)


def test_precomputed_reference_under_fsdp_equals_one_process(single_process, two_ranks):
    assert _close(two_ranks["precompute"]["losses"], single_process["full"]["train_step_loss"])
    assert math.isclose(two_ranks["precompute"]["eval_loss"], single_process["full"]["best_eval_loss"], rel_tol=RTOL)


@pytest.mark.parametrize("kind,first", [("qlora", LN2), ("qlora_ipo", 1.0)])
def test_qlora_dpo_on_two_ranks_starts_at_the_reference_and_trains_the_adapter(two_ranks, kind, first):
    """Step 1: ln 2 (sigmoid) and 1/(4 beta^2) = 1 (IPO, beta 0.5): the policy (4-bit base + a new
    adapter) is the reference; then the loss moves and only the adapter changed."""
    r = two_ranks[kind]
    assert math.isclose(r["losses"][0], first, rel_tol=1e-6), r["losses"]
    assert all(not math.isclose(loss, first, rel_tol=1e-3) for loss in r["losses"][1:]), r["losses"]
    assert r["changed"] and all("lora_" in n for n in r["changed"]), r["changed"]


def test_qlora_dpo_reference_is_the_quantized_base_with_the_adapter_off(setting, two_ranks, tiny_model_dir):
    """The run's evaluation figures (2 held-out pairs, one per rank) are those of the saved adapter on
    the 4-bit base against the 4-bit base alone, by hand; against the unquantized base they differ."""
    import warnings

    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardtune.config import parse_args
    from shardtune.data.preference import PreferenceCollator, encode
    from shardtune.model.loading import load_model
    from shardtune.model.quantization import bnb_config, keep_packed_layout
    from shardtune.train.dpo import sequence_logps

    out = setting["root"] / "qlora"
    metrics = json.loads((out / "metrics.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = PreferenceCollator(tok.pad_token_id)([encode(row, tok) for row in _pairs(42)[:2]])  # the eval split
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    q = parse_args(list(QLORA)).config.quantization
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        quantized = load_model(str(tiny_model_dir), dtype=torch.float32, attn="sdpa",
                               quantization=bnb_config("4bit", q))
        keep_packed_layout(quantized)
        policy = PeftModel.from_pretrained(quantized, str(out)).eval()
        pi = sequence_logps(policy, inputs, batch["labels"]).double()
        with policy.disable_adapter():
            ref = sequence_logps(policy, inputs, batch["labels"]).double()
        plain = sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
                               inputs, batch["labels"]).double()
    beta = 0.1  # the default
    for reference, equal in ((ref, True), (plain, False)):
        chosen, rejected = beta * (pi[:2] - reference[:2]), beta * (pi[2:] - reference[2:])
        loss = float(-F.logsigmoid(chosen - rejected).mean())
        got = (metrics["val_rewards_chosen"][-1], metrics["val_rewards_rejected"][-1], metrics["val_epoch_loss"][-1])
        want = (float(chosen.mean()), float(rejected.mean()), loss)
        assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(got, want)) == equal, (got, want)


def test_a_resumed_precompute_run_reads_the_stored_reference_and_continues_exactly(setting, single_process, capsys):
    """--dpo_config.precompute_reference writes <output_dir>/dpo_reference_logps.json once; --resume
    reads it (the file is not rewritten, no reference pass runs) and the losses are the uninterrupted run's."""
    c, root = setting["common"], setting["root"]
    out = root / "precompute-resume"
    args = _single(c, "--dpo_config.precompute_reference", "--output_dir", str(out), "--save_every_n_steps", "1")
    capsys.readouterr()
    first = finetune([*args, "--max_train_step", "2"])
    assert "precomputed for every pair" in capsys.readouterr().out
    stored = out / "dpo_reference_logps.json"
    before = stored.stat()
    resumed = finetune([*args, "--resume"])
    said = capsys.readouterr().out
    assert f"reference: read from {stored}" in said and "precomputed for every pair" not in said, said[-3000:]
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    whole = single_process["precompute"]["train_step_loss"]
    assert _close(first["train_step_loss"], whole[:2], rtol=1e-6) and _close(resumed["train_step_loss"], whole[2:],
                                                                               rtol=1e-6), (first, resumed, whole)


def test_two_resumed_ranks_read_the_stored_reference(setting, two_ranks):
    """Written before the first part's first step and not again: older than its step-2 checkpoint."""
    out = setting["root"] / "resume-precompute"
    stored = out / "dpo_reference_logps.json"
    step2 = out / "checkpoints" / "fine-tuned" / "step-000002"
    assert stored.stat().st_mtime_ns < step2.stat().st_mtime_ns
