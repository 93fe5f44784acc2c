"""--compile (parallel/compile.py): torch.compile of each decoder layer gives the eager losses, with
full fine-tuning and LoRA, and the start-up line and result report the compile time; refused where
inductor cannot work. (Under FSDP with activation checkpointing on 2 ranks: test_fsdp_speed.py.)

Compiling costs tens of seconds per model on a 2-core CPU the first time (inductor caches its
kernels on disk, so later runs take seconds): ~40 s for the full fine-tune here with a cold cache,
~20 s more for LoRA (marked ``slow``)."""

from __future__ import annotations

import json

import pytest
import torch

from shardtune.config import ShardtuneError
from shardtune.parallel.compile import check_compile

# Compiled kernels fuse and reorder fp32 arithmetic: equal to a few ulps per op, not bit for bit.
RTOL = 1e-4


@pytest.fixture(scope="module")
def common(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    data = root / "rows.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "input": "",
                                 "output": f"The answer is {2 * i + 1}."} for i in range(40)]))
    # packing: every batch has one shape, so each model compiles once
    return ["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
            str(data), "--output_dir", str(root / "out"), "--save_model", "False", "--num_epochs", "1",
            "--max_train_step", "3", "--lr", "1e-3", "--seed", "1", "--device", "cpu", "--context_length", "64",
            "--batch_size_training", "2", "--batching_strategy", "packing", "--run_validation", "False"]


# No dropout: inductor draws its own random numbers, so a compiled run's dropout masks differ from
# eager's (equal in distribution, not bit for bit).
@pytest.mark.parametrize("extra", [(), pytest.param(("--use_peft", "--lora_config.lora_dropout", "0"),
                                                     marks=pytest.mark.slow)], ids=["full", "lora"])
def test_compiled_layers_give_the_eager_losses(common, extra, capsys):
    from shardtune.finetuning import main as finetune

    eager = finetune([*common, *extra])
    compiled = finetune([*common, *extra, "--compile"])
    assert len(eager["train_step_loss"]) == 3
    assert compiled["train_step_loss"] == pytest.approx(eager["train_step_loss"], rel=RTOL)
    assert eager["compile_s"] is None and compiled["compile_s"] > 0
    assert "compile: compiled 2 decoder layers in" in capsys.readouterr().out


def test_compile_refused_without_a_cpp_compiler():
    import torch._inductor.config as inductor

    with inductor.patch({"cpp.cxx": ("shardtune-no-such-compiler",)}):
        with pytest.raises(ShardtuneError, match="needs a C\\+\\+ compiler"):
            check_compile(torch.device("cpu"))
    check_compile(torch.device("cpu"))  # this machine has g++


def test_padded_batches_with_and_without_pads_share_one_compiled_graph():
    """The built-in collator's padded batches run without an attention mask (causal_padding), so a
    compiled layer (dynamic shapes) neither recompiles for another length nor for a batch that has
    pads: one graph for all of them."""
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.data.collate import PaddingCollator
    from shardtune.parallel.compile import compile_decoder_layers
    from shardtune.train.loop import loss_sum

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                                         attn_implementation="sdpa")).train()
    compile_decoder_layers(model, dynamic=True)
    collate = PaddingCollator(pad_id=0)
    for lengths in ([20, 20], [20, 15], [31, 9], [12, 12]):
        rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
        loss_sum(model, collate(rows), chunk_tokens=1024).backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
