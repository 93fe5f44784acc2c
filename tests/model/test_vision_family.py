"""The Mllama (Llama 3.2 Vision) adapter of the family table: class, processor, FSDP/AC units,
freeze groups, LoRA targets, names, probes, and single-process training with each freeze option."""

from __future__ import annotations

import warnings

import pytest
import torch

from shardtune.config import ShardtuneError, parse_args
from shardtune.model.family import decoder_layers, family_for_config, family_of
from shardtune.model.freeze import freeze_llm_only, freeze_vision_tower
from shardtune.model.loading import load_config, load_inputs, load_model
from shardtune.model.peft import apply_peft
from shardtune.model.probes import probe_inputs, probe_logits


@pytest.fixture
def vision(tiny_vision_model_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(str(tiny_vision_model_dir), dtype=torch.float32, attn="sdpa")


def test_the_family_table_loads_the_whole_vision_model_and_its_processor(vision, tiny_vision_model_dir, tiny_model_dir):
    assert type(vision).__name__ == "MllamaForConditionalGeneration"  # not the text-only MllamaForCausalLM
    assert family_of(vision).is_vision and not family_for_config(load_config(str(tiny_model_dir))).is_vision
    processor = load_inputs(str(tiny_vision_model_dir))
    assert type(processor).__name__ == "MllamaProcessor" and processor.tokenizer.padding_side == "right"
    assert type(load_inputs(str(tiny_model_dir))).__name__ != "MllamaProcessor"


def test_fsdp_units_cover_both_towers(vision):
    kinds = [type(m).__name__ for m in decoder_layers(vision)]
    # 2 local + 1 global vision encoder layers; text layers 0 and 2 self-attention, 1 cross-attention
    assert kinds.count("MllamaVisionEncoderLayer") == 3
    assert kinds.count("MllamaSelfAttentionDecoderLayer") == 2 and kinds.count("MllamaCrossAttentionDecoderLayer") == 1


def _saved_tensors(model, inputs) -> int:
    """Tensors the forward keeps for backward outside activation-checkpointed blocks."""
    count = {"n": 0}

    def pack(t):
        count["n"] += 1
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
    loss.backward()
    return count["n"]


def test_activation_checkpointing_reaches_the_vision_encoder_without_renaming(tiny_vision_model_dir):
    from shardtune.parallel.activation_checkpointing import enable_activation_checkpointing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text_only, both = (load_model(str(tiny_vision_model_dir), dtype=torch.float32, attn="sdpa") for _ in range(2))
    inputs = probe_inputs(both)
    names = [n for n, _ in both.named_parameters()]
    text_only.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_activation_checkpointing(both)
    assert [n for n, _ in both.named_parameters()] == names  # no _checkpoint_wrapped_module parts
    # transformers alone checkpoints the text decoder; ours also recomputes the vision encoder layers
    assert _saved_tensors(both, inputs) < _saved_tensors(text_only, inputs)


def test_freeze_llm_only_is_llama_recipes_and_freeze_vision_tower_its_complement(vision):
    freeze_llm_only(vision)
    trainable = {n for n, p in vision.named_parameters() if p.requires_grad}
    assert any("layers.1.cross_attn" in n for n in trainable)  # the cross-attention decoder layer...
    assert any("layers.1.mlp" in n for n in trainable)  # ...all of it, as llama-recipes
    assert not any("layers.0." in n and "language_model" in n for n in trainable)
    assert not any(n.startswith("lm_head") or "embed_tokens" in n for n in trainable)
    assert any("vision_model" in n for n in trainable) and any("multi_modal_projector" in n for n in trainable)
    for p in vision.parameters():
        p.requires_grad_(True)
    freeze_vision_tower(vision)
    frozen = {n for n, p in vision.named_parameters() if not p.requires_grad}
    assert frozen and all("vision_model" in n or "multi_modal_projector" in n for n in frozen)


def test_plain_lora_targets_stay_in_the_language_model_and_dotted_ones_reach_the_tower(vision):
    model = apply_peft(vision, parse_args(["--use_peft", "--lora_config.r", "2"]).config)
    adapted = {n.rsplit(".lora_", 1)[0] for n, p in model.named_parameters() if ".lora_A" in n}
    assert adapted and all("language_model" in n for n in adapted)
    assert any("cross_attn.q_proj" in n for n in adapted) and any("self_attn.v_proj" in n for n in adapted)


def test_a_plain_lora_target_the_language_model_lacks_is_refused_not_dropped(vision):
    from shardtune.config.errors import ConfigError

    cfg = parse_args(["--use_peft", "--lora_config.target_modules", "q_proj,fc1"]).config
    with pytest.raises(ConfigError, match=r"'fc1'.*outside the language model.*mlp\.fc1"):
        apply_peft(vision, cfg)  # fc1 is the vision MLP's: q_proj alone must not silently train
    cfg = parse_args(["--use_peft", "--lora_config.target_modules", "q_projj"]).config
    with pytest.raises(ConfigError, match="no module has that name"):
        apply_peft(vision, cfg)


def test_dotted_lora_targets_reach_the_vision_tower(tiny_vision_model_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(str(tiny_vision_model_dir), dtype=torch.float32, attn="sdpa")
    cfg = parse_args(["--use_peft", "--lora_config.r", "2", "--lora_config.target_modules", "self_attn.q_proj"]).config
    adapted = {n for n, _ in apply_peft(model, cfg).named_parameters() if ".lora_A" in n}
    assert any("vision_model" in n for n in adapted) and any("language_model" in n for n in adapted)


def test_the_probe_sees_the_image(vision):
    inputs = probe_inputs(vision)
    with_image = probe_logits(vision, inputs)
    other = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))
    with torch.no_grad():
        vision.model.language_model.layers[1].cross_attn_attn_gate.fill_(1.0)  # open the zero-init gate
    assert not torch.allclose(probe_logits(vision, inputs), probe_logits(vision, other))
    assert with_image.shape[:2] == inputs["input_ids"].shape


def _run(tmp_path, model_dir, data, *extra):
    from shardtune.finetuning import main as finetune

    return finetune(["--model_name", str(model_dir), "--dataset", "ocrvqa_dataset", "--ocrvqa_dataset.data_path",
                     str(data), "--batching_strategy", "padding", "--output_dir", str(tmp_path / "out"),
                     "--num_epochs", "1", "--max_train_step", "3", "--batch_size_training", "4", "--lr", "2e-3",
                     "--run_validation", "False", "--num_workers_dataloader", "0", "--device", "cpu", *extra])


def test_single_process_freeze_llm_only_keeps_the_language_model_bit_identical(tmp_path, tiny_vision_model_dir,
                                                                               colour_rows, capsys):
    import json

    from safetensors.torch import load_file

    result = _run(tmp_path, tiny_vision_model_dir, colour_rows, "--freeze_LLM_only", "True", "--flop_counter",
                  "--flop_counter_start", "1", "--save_metrics")
    assert "FLOP counter (step 2)" in capsys.readouterr().out  # the counter sees the vision model's step
    assert len(json.loads((tmp_path / "out" / "metrics.json").read_text())["train_step_loss"]) == 3
    before = load_file(str(tiny_vision_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(before) == set(after)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # saved (pre-transformers-5) names: language_model.model.layers.1 is the cross-attention layer
    frozen = {n for n in before if n.startswith("language_model.") and ".layers.1." not in n}
    assert frozen and not changed & frozen
    assert any(n.startswith("vision_model.") for n in changed) and any(".layers.1." in n for n in changed)
    assert result["train_step_loss"][-1] < result["train_step_loss"][0]


def test_single_process_freeze_vision_tower_trains_exactly_the_language_model(tmp_path, tiny_vision_model_dir,
                                                                               colour_rows):
    from safetensors.torch import load_file

    _run(tmp_path, tiny_vision_model_dir, colour_rows, "--freeze_vision_tower")
    before = load_file(str(tiny_vision_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    tower = {n for n in before if n.startswith(("vision_model.", "multi_modal_projector."))}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert tower and not changed & tower
    assert changed == set(before) - tower  # every language-model weight trained


def test_a_vision_batch_without_images_is_an_error_not_a_silent_text_run(tmp_path, tiny_vision_model_dir):
    """A custom dataset of text rows for a vision model: Mllama would skip its vision side (and
    under FSDP ranks with and without images would run different collectives)."""
    from shardtune.finetuning import main as finetune

    data = tmp_path / "text.py"
    data.write_text("def get_custom_dataset(dataset_config, processor, split):\n"
                    "    ids = processor.tokenizer('a short text row').input_ids\n"
                    "    return [{'input_ids': ids, 'labels': ids} for _ in range(8)]\n")
    with pytest.raises(ShardtuneError, match="A batch has no pixel_values"):
        finetune(["--model_name", str(tiny_vision_model_dir), "--dataset", "custom_dataset", "--custom_dataset.file",
                  str(data), "--batching_strategy", "padding", "--output_dir", str(tmp_path / "o"),
                  "--batch_size_training", "2", "--run_validation", "False", "--num_workers_dataloader", "0",
                  "--device", "cpu", "--custom_dataset.test_split", "test"])


def test_vision_options_that_cannot_work_are_refused_before_any_work(tmp_path, tiny_vision_model_dir, tiny_model_dir,
                                                                      colour_rows):
    from shardtune.finetuning import main as finetune

    base = ["--dataset", "ocrvqa_dataset", "--ocrvqa_dataset.data_path", str(colour_rows), "--output_dir",
            str(tmp_path / "o"), "--device", "cpu"]
    with pytest.raises(ShardtuneError, match="packing is not available for vision models"):
        finetune(["--model_name", str(tiny_vision_model_dir), *base])
    with pytest.raises(ShardtuneError, match="llama_adapter is for text models"):
        finetune(["--model_name", str(tiny_vision_model_dir), *base, "--batching_strategy", "padding", "--use_peft",
                  "--peft_method", "llama_adapter"])
    for flag in ("--freeze_vision_tower", "--freeze_LLM_only"):
        with pytest.raises(ShardtuneError, match="this model has none"):
            finetune(["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset", flag,
                      "--output_dir", str(tmp_path / "o")])
        with pytest.raises(ShardtuneError, match="--use_peft freezes all of them"):
            finetune(["--model_name", str(tiny_vision_model_dir), *base, "--batching_strategy", "padding",
                      flag, "--use_peft"])
    assert not (tmp_path / "o").exists()


def test_vision_lora_merge_loads_and_equals_the_adapter_model(tmp_path, tiny_vision_model_dir, colour_rows):
    from peft import PeftModel
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    _run(tmp_path, tiny_vision_model_dir, colour_rows, "--use_peft", "--merge_lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = MllamaForConditionalGeneration.from_pretrained(tiny_vision_model_dir, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
        merged = MllamaForConditionalGeneration.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    inputs = probe_inputs(merged)
    torch.testing.assert_close(probe_logits(merged, inputs), probe_logits(adapted, inputs), rtol=1e-5, atol=1e-5)
    assert AutoProcessor.from_pretrained(tmp_path / "out" / "merged").chat_template


def test_a_text_dataset_for_a_vision_model_is_refused_before_work(tiny_vision_model_dir, tmp_path, shardtune_cli):
    """`--model_name <Llama 3.2 Vision> --dataset alpaca_dataset` through the CLI: one paragraph that
    names both and the vision datasets, exit 2 (it was MllamaProcessor's AttributeError on .encode)."""
    import json

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(8)]))
    proc = shardtune_cli(["finetune", "--model_name", str(tiny_vision_model_dir), "--dataset", "alpaca_dataset",
                          "--alpaca_dataset.data_path", str(data), "--device", "cpu", "--output_dir", str(tmp_path / "out")],
                         timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--dataset alpaca_dataset is a text dataset" in proc.stderr and "ocrvqa_dataset" in proc.stderr
    assert not (tmp_path / "out").exists()
