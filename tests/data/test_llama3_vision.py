"""The vision path with a real Llama 3.2 Vision processor: ``MllamaProcessor`` = the real Llama 3
tokenizer + <|image|> (id 128256) + an image processor + Llama 3.2 Vision Instruct's chat template,
over a tiny Mllama of the real vocabulary: dataset masks, batches, the loss, generation with an
image and the quick evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from shardtune.config import parse_args
from shardtune.data import build_dataloader, load_split
from shardtune.infer.generate import Sampling, generate_batch
from shardtune.infer.loading import load_for_inference
from shardtune.infer.prompts import Prompt

IGNORE = -100


@pytest.fixture(scope="module")
def loaded(real_vocab_vision_model_dir):
    return load_for_inference(str(real_vocab_vision_model_dir), dtype=torch.float32)


def _cfg(rows):
    return parse_args(["--dataset", "ocrvqa_dataset", "--ocrvqa_dataset.data_path", str(rows),
                       "--batching_strategy", "padding", "--context_length", "512"]).config


def test_samples_batches_and_loss(loaded, colour_rows):
    model, processor = loaded
    tok = processor.tokenizer
    rows = [json.loads(line) for line in colour_rows.read_text().splitlines()]
    split = load_split(_cfg(colour_rows), processor, "train")
    assert len(split.samples) == 36
    answers = {r["texts"][0]["assistant"] for r in rows}
    for sample in split.samples[:6]:
        ids, labels = sample["input_ids"], sample["labels"]
        trained = [t for t in labels if t != IGNORE]
        assert tok.decode(trained) in {a + "<|eot_id|>" for a in answers}  # the answer and its end of turn
        assert ids[0] == 128000 and ids.count(128256) == 1 and ids.count(128000) == 1
        assert ids.index(128256) < len(ids) - len(trained)  # the image is in the prompt, untrained
        assert "Today Date" not in tok.decode(ids)  # with an image the template writes no system block
        # the same ids the processor gives for the template's rendering of the row
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the block?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": tok.decode(trained[:-1])}]}]
        image = Image.open(sample["images"][0]).convert("RGB")
        expected = processor(images=[[image]], text=[processor.apply_chat_template(messages)],
                             add_special_tokens=False)["input_ids"][0]
        assert ids == list(expected)
    loader = build_dataloader(split.samples, tokenizer=processor, strategy="padding", batch_size=4,
                              context_length=512, shuffle=False, seed=0, collate_fn=split.collate_fn)
    batch = next(iter(loader))
    assert batch["input_ids"].max() == 128256 and batch["pixel_values"].dim() == 6
    with torch.no_grad():
        loss = model(**batch).loss
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(128256)) < 1.0  # ~uniform over the vocab


def test_generation_about_an_image_uses_the_vision_template(loaded, colour_rows):
    model, processor = loaded
    image = Image.open(colour_rows.parent / "images" / "0.png").convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    inputs = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=[128001, 128008, 128009],
                             pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    got = generate_batch(model, processor, [Prompt(text="What colour is it?")], Sampling(max_new_tokens=5), image=image)
    assert got == [expected]


def test_quick_eval_gives_the_loss(real_vocab_vision_model_dir, colour_rows, tmp_path):
    from shardtune.eval.cli import main as eval_main
    from transformers import AutoProcessor

    result = eval_main([str(real_vocab_vision_model_dir), "--dataset", "ocrvqa_dataset", "--ocrvqa_dataset.data_path",
                        str(colour_rows), "--output", str(tmp_path / "r.json")])
    test = load_split(_cfg(colour_rows), AutoProcessor.from_pretrained(real_vocab_vision_model_dir), "test")
    assert result["samples"] == 4 and math.isfinite(result["loss"])
    assert result["label_tokens"] == sum(sum(v != IGNORE for v in s["labels"][1:]) for s in test.samples)
