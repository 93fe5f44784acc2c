"""The recipe end to end in one process: datasets, saving semantics, outputs that load, options."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from shardtune.config import ShardtuneError, parse_args
from shardtune.finetuning import main as finetune
from shardtune.finetuning import setup, train
from shardtune.parallel.distributed import init_distributed


def _alpaca(path: Path, n: int = 48) -> Path:
    rows = [{"instruction": f"Count to {i % 7}.", "input": "" if i % 3 else "slowly",
             "output": " ".join(str(k) for k in range(i % 7 + 1))} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def _grammar(path: Path, n: int) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["input", "target"])
        for i in range(n):
            w.writerow([f"he go to school {i}", f"He goes to school {i}."])
    return path


def _args(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--model_name", str(model_dir), "--dataset", "alpaca_dataset",
            "--alpaca_dataset.data_path", str(_alpaca(tmp_path / "alpaca.json")),
            "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--batching_strategy", "padding",
            "--batch_size_training", "8", "--context_length", "128", "--lr", "3e-3", *extra]


def _probe(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode("Count to 3.")])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_fine_tune_saves_an_hf_model_with_the_trained_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = parse_args(_args(tiny_model_dir, tmp_path, "--num_epochs", "2", "--run_validation", "False",
                           "--save_metrics")).config
    env = init_distributed("cpu")
    c = setup(cfg, env)
    results = train(cfg, env, c)
    out = tmp_path / "out"
    assert results["saved_at_steps"] == [5, 10]  # no validation: saved after every epoch
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(loaded.parameters()).dtype == torch.float32  # the training dtype
    torch.testing.assert_close(_probe(loaded, c.tokenizer), _probe(c.model, c.tokenizer), rtol=0, atol=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_step_loss"]) == 10 and (out / "loss.png").is_file()
    assert metrics["train_step_loss"][-1] < metrics["train_step_loss"][0]


def test_validation_reports_loss_and_perplexity_and_saves_on_improvement(tiny_model_dir, tmp_path, capsys):
    results = finetune(_args(tiny_model_dir, tmp_path, "--num_epochs", "2", "--save_metrics"))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    losses, ppls = metrics["val_epoch_loss"], metrics["val_epoch_perplexity"]
    assert len(losses) == 2 and all(math.isclose(p, math.exp(x)) for x, p in zip(losses, ppls))
    assert results["best_eval_loss"] == min(losses)
    assert results["saved_at_steps"] and results["saved_at_steps"][0] == 5
    printed = capsys.readouterr().out
    assert "Epoch 1/2: train_loss=" in printed and "val_loss=" in printed and "val_ppl=" in printed


def test_max_train_step_stops_and_averages_over_the_steps_run(tiny_model_dir, tmp_path):
    results = finetune(_args(tiny_model_dir, tmp_path, "--max_train_step", "3", "--num_epochs", "3",
                             "--save_model", "False"))
    assert results["steps"] == 3 and len(results["train_step_loss"]) == 3


def test_grammar_dataset_from_csv_files(tiny_model_dir, tmp_path):
    results = finetune(["--model_name", str(tiny_model_dir), "--dataset", "grammar_dataset",
                        "--grammar_dataset.train_split", str(_grammar(tmp_path / "train.csv", 32)),
                        "--grammar_dataset.test_split", str(_grammar(tmp_path / "test.csv", 8)),
                        "--output_dir", str(tmp_path / "out"), "--device", "cpu",
                        "--batch_size_training", "8", "--batching_strategy", "padding",
                        "--save_model", "False", "--num_epochs", "1"])
    assert results["steps"] == 4 and results["best_eval_loss"] is not None


@pytest.mark.parametrize("method,weights", [("lora", "lora_"), ("llama_adapter", "adaption_")])
def test_peft_fine_tune_writes_an_adapter_that_peft_loads(tiny_model_dir, tmp_path, method, weights):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    extra = ["--llama_adapter_config.adapter_layers", "2"] if method == "llama_adapter" else []
    finetune(_args(tiny_model_dir, tmp_path, "--use_peft", "--peft_method", method, "--num_epochs", "1",
                   "--run_validation", "False", *extra))
    out = tmp_path / "out"
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and all(weights in k for k in tensors)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


def test_fp16_on_cpu_trains_with_a_grad_scaler(tiny_model_dir, tmp_path):
    results = finetune(_args(tiny_model_dir, tmp_path, "--use_fp16", "--max_train_step", "3",
                             "--save_model", "False", "--run_validation", "False"))
    assert all(math.isfinite(x) for x in results["train_step_loss"])


def test_flop_counter_reports_tflops(tiny_model_dir, tmp_path, capsys):
    finetune(_args(tiny_model_dir, tmp_path, "--flop_counter", "--flop_counter_start", "1",
                   "--max_train_step", "3", "--save_model", "False", "--run_validation", "False"))
    assert "FLOP counter (step 2)" in capsys.readouterr().out


def test_profiler_writes_a_trace(tiny_model_dir, tmp_path):
    prof = tmp_path / "prof"
    finetune(_args(tiny_model_dir, tmp_path, "--use_profiler", "--profiler_dir", str(prof),
                   "--max_train_step", "6", "--save_model", "False", "--run_validation", "False"))
    assert list(prof.rglob("*.json")) or list(prof.rglob("*.pt.trace.json*"))


# --- output directories: no run destroys or mixes into a user's files ---

def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _quick(model_dir: Path, tmp_path: Path, out: Path, *extra: str) -> list[str]:
    args = _args(model_dir, tmp_path, "--num_epochs", "1", "--max_train_step", "1", "--run_validation", "False",
                 *extra)
    args[args.index("--output_dir") + 1] = str(out)
    return args


def test_output_dir_with_another_models_files_is_refused_and_left_byte_identical(tiny_model_dir, tmp_path):
    other = _copy_model(tiny_model_dir, tmp_path / "other-model")
    (other / "special_tokens_map.json").write_text('{"eos_token": "<|other|>"}')
    before = _snapshot(other)
    with pytest.raises(ShardtuneError, match=r"holds files shardtune did not write \(.*special_tokens_map\.json"):
        finetune(_quick(tiny_model_dir, tmp_path, other))
    assert _snapshot(other) == before


@pytest.mark.parametrize("peft", [False, True])
def test_output_dir_equal_to_the_model_is_always_refused(tiny_model_dir, tmp_path, peft):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    before = _snapshot(model)
    extra = ["--use_peft", "--overwrite_output_dir"] if peft else ["--overwrite_output_dir"]
    with pytest.raises(ShardtuneError, match="is the path --model_name reads from"):
        finetune(_quick(model, tmp_path, model, *extra))
    assert _snapshot(model) == before


def test_overwrite_writes_beside_foreign_files_and_never_removes_them(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out-dir"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's weights")
    (out / "notes.txt").write_text("keep")
    finetune(_quick(tiny_model_dir, tmp_path, out, "--use_peft", "--overwrite_output_dir"))
    assert "2 entries shardtune did not write are in" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == b"someone else's weights"  # the PEFT save left it
    assert (out / "notes.txt").read_text() == "keep" and (out / "adapter_model.safetensors").is_file()


def test_a_rerun_into_its_own_output_needs_no_flag_and_replaces_its_files(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    finetune(_quick(tiny_model_dir, tmp_path, out, "--save_metrics"))
    first = _snapshot(out)
    finetune(_quick(tiny_model_dir, tmp_path, out, "--save_metrics", "--use_peft"))  # full -> adapter
    names = {p.name for p in out.iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names  # its own stale file went
    assert "metrics.json" in names and set(first) - {"model.safetensors", "config.json"} <= names | {
        "generation_config.json", ".shardtune-files.json"}


def test_output_dir_that_is_a_file_is_refused_before_training(tiny_model_dir, tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(ShardtuneError, match="is a file"):
        finetune(_quick(tiny_model_dir, tmp_path, path))
    assert path.read_text() == "x"


# --- non-finite training never becomes a saved model ---

def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(tiny_model_dir, tmp_path):
    from shardtune.train.loop import NonFiniteStep

    out = tmp_path / "nan"
    # lr 1e30: step 1 is finite and checkpointed; its update makes the logits overflow at step 2
    args = _quick(tiny_model_dir, tmp_path, out, "--lr", "1e30", "--max_train_step", "3",
                  "--save_every_n_steps", "1")
    with pytest.raises(NonFiniteStep, match=r"stopped at step 2 .*the loss is nan.*--skip_nonfinite_steps") as e:
        finetune(args)
    assert e.value.step == 2
    ckpts = sorted(p.name for p in (out / "checkpoints" / "fine-tuned").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000001"] and not list(out.glob("*.safetensors"))
    results = finetune(args + ["--skip_nonfinite_steps", "--save_every_n_steps", "0"])
    assert results["steps"] == 3 and len(results["train_step_loss"]) == 1  # steps 2 and 3 skipped


def test_a_model_with_non_finite_weights_is_never_saved(tiny_model_dir, tmp_path):
    from shardtune.finetuning import refuse_non_finite
    from shardtune.parallel.distributed import DistEnv

    cfg = parse_args(_quick(tiny_model_dir, tmp_path, tmp_path / "o")).config
    env = DistEnv()
    c = setup(cfg, env)
    refuse_non_finite(c.model, env, 1, "model")  # finite: fine
    with torch.no_grad():
        next(c.model.parameters())[0, 0] = float("nan")
    with pytest.raises(ShardtuneError, match="non-finite .* was not saved"):
        refuse_non_finite(c.model, env, 1, "model")


# --- every LoRA option: the saved adapter (and the merged model) give the trained model's logits ---

@pytest.mark.parametrize("option", [
    ["--lora_config.use_rslora", "--merge_lora"],
    ["--lora_config.modules_to_save", "lm_head", "--merge_lora"],
    ["--lora_config.target_modules", "all-linear", "--lora_config.r", "4", "--merge_lora"],
    ["--lora_config.use_dora"],
])
def test_lora_options_train_and_save_what_was_trained(tiny_model_dir, tmp_path, option):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shardtune.finetuning import merge_saved_adapter

    cfg = parse_args(_args(tiny_model_dir, tmp_path, "--use_peft", "--num_epochs", "1", "--max_train_step", "3",
                           "--run_validation", "False", "--lr", "2e-2", *option)).config
    env = init_distributed("cpu")
    c = setup(cfg, env)
    base = {n: p.detach().clone() for n, p in c.model.named_parameters() if not p.requires_grad}
    merge_saved_adapter(cfg, env, train(cfg, env, c))  # what run() does after training
    assert all(torch.equal(base[n], p) for n, p in c.model.named_parameters() if n in base)  # base untouched
    trained = _probe(c.model, c.tokenizer)
    out = tmp_path / "out"
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    torch.testing.assert_close(_probe(adapter, c.tokenizer), trained, rtol=0, atol=1e-5)
    untrained = _probe(AutoModelForCausalLM.from_pretrained(tiny_model_dir), c.tokenizer)
    assert (trained - untrained).abs().max() > 1e-3  # the options did train something
    if "--merge_lora" in option:
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")
        torch.testing.assert_close(_probe(merged, c.tokenizer), trained, rtol=1e-4, atol=1e-4)
    else:
        assert not (out / "merged").exists()


# --- --merge_lora: the saved adapter folded into --model_name's files by convert's merge ---

MERGE_DATA = [{"instruction": f"Add {i} and {i + 1}.", "output": f"The answer is {2 * i + 1}."} for i in range(24)]


def _merge_run(model_dir: Path, tmp_path: Path, *extra: str) -> Path:
    data = tmp_path / "add.json"
    data.write_text(json.dumps(MERGE_DATA))
    out = tmp_path / "out"
    finetune(["--model_name", str(model_dir), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data),
              "--output_dir", str(out), "--use_peft", "--lora_config.lora_dropout", "0", "--num_epochs", "1",
              "--max_train_step", "3", "--lr", "2e-2", "--batch_size_training", "4", "--context_length", "64",
              "--device", "cpu", "--run_validation", "False", "--merge_lora", *extra])
    return out


def _adapter_and_merged(model_dir: Path, out: Path):
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    return adapted, merged


MERGE_IDS = torch.tensor([[1, 17, 42, 99, 5, 230, 7, 64]])


@pytest.mark.parametrize("lora", [
    ("--lora_config.target_modules", "q_proj,v_proj,embed_tokens,lm_head"),
    ("--lora_config.target_modules", "q_proj,v_proj,embed_tokens,lm_head", "--lora_config.modules_to_save", "norm"),
    ("--lora_config.target_modules", "q_proj,v_proj,embed_tokens", "--lora_config.modules_to_save", "lm_head"),
])
def test_merge_lora_gives_the_saved_adapters_logits_for_every_layer_kind(tiny_model_dir, tmp_path, capsys, lora):
    """A LoRA on the embeddings and the head (and modules_to_save copies) is merged: a dropped layer
    would change the logits far beyond fp32 rounding."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from shardtune.outputs.ownership import MARKER, owned

    out = _merge_run(tiny_model_dir, tmp_path, *lora)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for n, t in saved.items() if "lora_B" in n or "lora_embedding_B" in n)
    adapted, merged = _adapter_and_merged(tiny_model_dir, out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(MERGE_IDS).logits, adapted(MERGE_IDS).logits, rtol=0, atol=1e-5)
        assert (merged(MERGE_IDS).logits - base(MERGE_IDS).logits).abs().max() > 1e-2  # trained, and merged
    assert merged.dtype == torch.float32 and (out / "merged" / "tokenizer_config.json").is_file()
    assert "merged/" in owned(out) and (out / "merged" / MARKER).is_file()
    assert f"merged the adapter into the base {tiny_model_dir}: {out / 'merged'}" in capsys.readouterr().out


def test_merge_lora_on_a_tied_model(tiny_tied_model_dir, tmp_path):
    """q/v LoRA on a model whose head is its embeddings: merged, still tied. A LoRA on the tied
    embeddings is refused before training (a merged model would change the head too)."""
    out = _merge_run(tiny_tied_model_dir, tmp_path)
    adapted, merged = _adapter_and_merged(tiny_tied_model_dir, out)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(MERGE_IDS).logits, adapted(MERGE_IDS).logits, rtol=0, atol=1e-5)
    (tmp_path / "refused").mkdir()
    with pytest.raises(ShardtuneError, match="cannot merge the LoRA layer model.embed_tokens .*tied"):
        _merge_run(tiny_tied_model_dir, tmp_path / "refused", "--lora_config.target_modules", "q_proj,embed_tokens")
    assert not (tmp_path / "refused" / "out" / "adapter_model.safetensors").exists()


def test_merged_dtype_is_the_export_or_training_dtype():
    from shardtune.finetuning import merged_dtype
    from shardtune.parallel.distributed import DistEnv

    def dtype(*flags):
        return merged_dtype(parse_args(["--use_peft", "--merge_lora", *flags]).config, DistEnv())

    assert dtype() == "float32" and dtype("--fsdp_config.pure_bf16") == "bfloat16"  # as a full export
    assert dtype("--export_dtype", "bf16") == "bf16"
    assert dtype("--quantization", "4bit") == "keep"  # the unquantized base's own dtype


def test_lora_options_that_cannot_work_are_refused_up_front():
    from shardtune.config import ConfigError

    with pytest.raises(ConfigError, match="use_dora and --lora_config.modules_to_save with --low_cpu_fsdp"):
        parse_args(["--enable_fsdp", "--low_cpu_fsdp", "--use_peft", "--lora_config.use_dora",
                    "--lora_config.modules_to_save", "lm_head"])
    with pytest.raises(ConfigError, match="cannot merge DoRA"):
        parse_args(["--use_peft", "--lora_config.use_dora", "--merge_lora"])


def test_low_cpu_refuses_a_saved_dora_adapter_up_front(tmp_path):
    from shardtune.config import ConfigError

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(ConfigError, match="a DoRA adapter \\(--from_peft_checkpoint\\) with --low_cpu_fsdp"):
        parse_args(["--enable_fsdp", "--low_cpu_fsdp", "--use_peft", "--from_peft_checkpoint", str(tmp_path)])


# --- QLoRA (bitsandbytes runs 4-bit and 8-bit layers on this CPU) ---

@pytest.mark.parametrize("bits,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_qlora_trains_an_adapter_on_a_frozen_quantized_base(tiny_model_dir, tmp_path, bits, layer):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from shardtune.model.loading import load_model
    from shardtune.model.quantization import bnb_config, keep_packed_layout

    cfg = parse_args(_args(tiny_model_dir, tmp_path, "--use_peft", "--quantization", bits,
                           "--quantization_config.quant_type", "nf4", "--quantization_config.use_double_quant",
                           "--quantization_config.compute_dtype", "float32",
                           "--quantization_config.quant_storage", "float32",
                           "--num_epochs", "1", "--max_train_step", "4", "--run_validation", "False",
                           "--lr", "1e-2", "--lora_config.lora_dropout", "0")).config
    env = init_distributed("cpu")
    c = setup(cfg, env)
    base = c.model.get_base_model()
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == layer
    frozen = {n: p.detach().clone() for n, p in c.model.named_parameters() if not p.requires_grad}
    results = train(cfg, env, c)
    assert results["train_step_loss"][-1] < results["train_step_loss"][0]

    def same_bits(a, b):  # packed 4-bit data viewed as float32 holds NaN patterns: compare bytes
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))

    assert all(same_bits(frozen[n], p) for n, p in c.model.named_parameters() if n in frozen)
    trained = _probe(c.model, c.tokenizer)
    # the adapter directory loads on the same quantized base with the trained logits...
    quantized = load_model(str(tiny_model_dir), dtype=torch.float32, attn="sdpa",
                           quantization=bnb_config(bits, cfg.quantization))
    keep_packed_layout(quantized)  # the same 4-bit kernel as training (not bitsandbytes' CPU repacking)
    reloaded = PeftModel.from_pretrained(quantized, tmp_path / "out")
    torch.testing.assert_close(_probe(reloaded, c.tokenizer), trained, rtol=0, atol=1e-4)
    # ...and on the unquantized base (what deployment and `convert --merge` use)
    from transformers import AutoModelForCausalLM

    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "out")
    assert torch.isfinite(_probe(full, c.tokenizer)).all()


@pytest.mark.parametrize("flags,message", [
    (["--quantization", "4bit"], "add --use_peft"),
    (["--quantization", "8bit", "--use_peft", "--enable_fsdp"], "int8 weights, which FSDP cannot shard"),
    (["--quantization", "4bit", "--use_peft", "--enable_fsdp", "--fsdp_config.fsdp_cpu_offload"], "Drop the offload"),
    (["--quantization", "2bit", "--use_peft"], "must be 4bit or 8bit"),
    (["--quantization", "4bit", "--use_peft", "--quantization_config.quant_type", "int4"], "fp4 or nf4"),
    (["--quantization", "4bit", "--use_peft", "--peft_method", "llama_adapter"], "needs --peft_method lora"),
])
def test_qlora_combinations_that_cannot_work_are_refused(flags, message):
    from shardtune.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


def test_qlora_keeps_training_after_an_evaluation(tiny_model_dir, tmp_path):
    """On CPUs with AVX512-BF16 bitsandbytes repacks a 4-bit weight for inference the first time it
    runs in eval mode without gradients; training after that evaluation went wrong (the loss
    stopped falling and the next evaluation repeated the last one to every digit)."""
    pytest.importorskip("bitsandbytes")
    from shardtune.finetuning import main as finetune

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "output": f"The answer is {2 * i + 1}."}
                                for i in range(40)]))
    result = finetune(["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
                       str(data), "--output_dir", str(tmp_path / "out"), "--save_model", "False", "--use_peft",
                       "--quantization", "4bit", "--quantization_config.compute_dtype", "float32",
                       "--quantization_config.quant_storage", "float32", "--num_epochs", "3", "--lr", "1e-2",
                       "--batch_size_training", "4", "--context_length", "64", "--device", "cpu",
                       "--lora_config.lora_dropout", "0", "--save_metrics"])
    val = json.loads((tmp_path / "out" / "metrics.json").read_text())["val_epoch_loss"]
    assert len(val) == 3 and val[0] > val[1] > val[2], val


def test_qlora_merge_lora_folds_the_adapter_into_the_plain_base(tiny_model_dir, tmp_path):
    """--merge_lora with --quantization: merged onto the unquantized base (its dtype), equal to the
    adapter applied by peft on that base; never into the 4-bit weights."""
    pytest.importorskip("bitsandbytes")
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shardtune.finetuning import main as finetune

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "output": f"The answer is {2 * i + 1}."}
                                for i in range(24)]))
    out = tmp_path / "out"
    finetune(["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
              str(data), "--output_dir", str(out), "--use_peft", "--lora_config.target_modules",
              "q_proj,v_proj,lm_head", "--quantization", "4bit", "--quantization_config.compute_dtype", "float32",
              "--quantization_config.quant_storage", "float32", "--num_epochs", "1", "--max_train_step", "3",
              "--lr", "1e-2", "--batch_size_training", "4", "--context_length", "64", "--device", "cpu",
              "--run_validation", "False", "--merge_lora"])
    ids = torch.tensor([[1, 17, 42, 99, 5, 230, 7]])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)  # the adapter is in it
    assert merged.dtype == base.dtype and (out / "merged" / "tokenizer_config.json").is_file()


def test_qlora_step_checkpoint_resumes_exactly_in_one_process_and_converts(tiny_model_dir, tmp_path):
    """One process: the checkpoint holds the adapter, its optimizer state and the 4-bit base's
    bitsandbytes state (absmax, quant_map ...); resume continues exactly, and convert reports the
    bitsandbytes state and writes the adapter (or, with --merge, the merged plain model)."""
    pytest.importorskip("bitsandbytes")
    from shardtune.convert.core import convert
    from shardtune.finetuning import main as finetune

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "output": f"The answer is {2 * i + 1}."}
                                for i in range(40)]))

    def run(out, *extra):
        return finetune(["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
                         str(data), "--output_dir", str(out), "--save_model", "False", "--use_peft", "--quantization",
                         "4bit", "--quantization_config.compute_dtype", "float32", "--quantization_config.quant_storage",
                         "float32", "--num_epochs", "1", "--lr", "1e-2", "--batch_size_training", "4",
                         "--context_length", "64", "--device", "cpu", "--run_validation", "False",
                         "--lora_config.lora_dropout", "0", *extra])["train_step_loss"]

    full = run(tmp_path / "full", "--max_train_step", "6")
    first = run(tmp_path / "r", "--max_train_step", "3", "--save_every_n_steps", "3")
    resumed = run(tmp_path / "r", "--max_train_step", "6", "--save_every_n_steps", "3", "--resume")
    assert first == pytest.approx(full[:3], rel=1e-6) and resumed == pytest.approx(full[3:], rel=1e-6)
    ckpt = tmp_path / "r" / "checkpoints" / "fine-tuned" / "step-000006"
    summary = convert(ckpt, tmp_path / "adapter")
    assert summary["adapter"] and any("bitsandbytes" in k for k in summary["dropped"])
    merged = convert(ckpt, tmp_path / "merged", merge=True, verify=True)
    assert not merged["adapter"] and merged["verify"]["max_abs_diff"] <= merged["verify"]["tolerance"]


def test_a_full_dpo_runs_reference_copy_prints_no_trainable_params_line(tiny_model_dir, tmp_path, capsys):
    """The frozen reference is built like the policy but trains nothing: no "trainable params ... 100%"."""
    from shardtune.finetuning import setup_reference_model
    from shardtune.model.loading import load_inputs
    from shardtune.parallel.distributed import DistEnv

    cfg = parse_args(["--model_name", str(tiny_model_dir), "--output_dir", str(tmp_path), "--device", "cpu"]).config
    capsys.readouterr()
    setup_reference_model(cfg, DistEnv(), load_inputs(str(tiny_model_dir)), None)
    said = capsys.readouterr().out
    assert "reference model (frozen, no gradients or optimizer state)" in said and "trainable params" not in said, said
