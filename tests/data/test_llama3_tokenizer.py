"""The real Llama 3 tokenizer (built from Meta's BPE file in ``llama-models``) and Llama 3.2's chat
templates, checked against Meta's own reference code: its tiktoken tokenizer and its chat format
(``llama_models.llama3``). The expectations are computed, never stored rendered text: the templates
print today's date (TRAPS.md)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from shardtune.data import load_split
from shardtune.data.prompts import GRAMMAR_PROMPT, SAMSUM_PROMPT, alpaca_prompt

IGNORE = -100
DATE = "26 Jul 2024"  # passed as date_string, so both sides render the same system block
TEXTS = ["Hello world!", "  leading spaces and\ttabs\n\nnew lines\r\n", "Numbers 1234567 and 3.14159",
         "naïve café — 東京 🚀", "def f(x):\n    return x ** 2  # square", "I'm sure they'll've done it"]


@pytest.fixture(scope="module")
def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def test_hello_world_and_the_special_tokens(llama3_tokenizer):
    tok = llama3_tokenizer
    assert tok.encode("Hello world!") == [128000, 9906, 1917, 0]
    assert tok.decode([9906, 1917, 0]) == "Hello world!"
    assert len(tok) == 128256 and tok.vocab_size >= 128000  # the cookbook's test for the chat path
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_247|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                   "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
                   "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|reserved_special_token_247|>": 128255}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128009, None)


def test_ids_equal_metas_tiktoken_tokenizer(llama3_tokenizer, meta_tokenizer):
    for text in TEXTS:
        assert llama3_tokenizer.encode(text) == meta_tokenizer.encode(text, bos=True, eos=False), text
        assert llama3_tokenizer.encode(text, add_special_tokens=False) == meta_tokenizer.encode(
            text, bos=False, eos=False), text
    # special tokens written in text are single ids, as Meta's tokenizer with allowed_special="all"
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert llama3_tokenizer.encode(text, add_special_tokens=False) == meta_tokenizer.encode(
        text, bos=False, eos=False, allowed_special="all")


def _meta_dialog(messages, system_block: bool, image: bytes | None = None):
    """Meta's reference tokens for ``messages`` (+ the assistant header), with the system block
    that the Llama 3.2 templates add (dates first, then the user's system text)."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    fmt = ChatFormat(Tokenizer.get_instance())
    raw = []
    rest = list(messages)
    if system_block:
        user_system = rest.pop(0)["content"] if rest and rest[0]["role"] == "system" else ""
        raw.append(RawMessage(role="system", content=(
            f"Cutting Knowledge Date: December 2023\nToday Date: {DATE}\n\n{user_system}")))
    for m in rest:
        content = m["content"]
        if not isinstance(content, str):
            content = [RawMediaItem(data=image) if part["type"] == "image" else RawTextItem(text=part["text"])
                       for part in content]
        raw.append(RawMessage(role=m["role"], content=content))
    tokens = fmt.encode_dialog_prompt(raw).tokens
    # llama-models 0.3.0 numbers <|image|> 128011; Hugging Face's Llama 3.2 Vision tokenizer adds it
    # after the 256 special tokens, at 128256 (its config's image_token_index).
    return [128256 if t == fmt.vision_token else t for t in tokens]


DIALOG = [{"role": "system", "content": "You are a terse assistant."},
          {"role": "user", "content": "What is 2 + 2?"},
          {"role": "assistant", "content": "4."},
          {"role": "user", "content": "And 3 + 3?"}]


def test_instruct_template_renders_metas_chat_format(llama3_tokenizer):
    tok = llama3_tokenizer
    ids = tok.apply_chat_template(DIALOG, add_generation_prompt=True, date_string=DATE, return_dict=False)
    assert ids == _meta_dialog(DIALOG, system_block=True)
    no_system = DIALOG[1:2]
    ids = tok.apply_chat_template(no_system, add_generation_prompt=True, date_string=DATE, return_dict=False)
    assert ids == _meta_dialog(no_system, system_block=True)  # the date block is there without one too


def test_vision_template_renders_metas_chat_format(real_vocab_vision_model_dir):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(real_vocab_vision_model_dir)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|image|>") == 128256 and len(tok) == 128257
    assert (tok.eos_token_id, tok.pad_token_id) == (128009, 128004)
    text = processor.apply_chat_template(DIALOG, add_generation_prompt=True, date_string=DATE)
    assert tok.encode(text, add_special_tokens=False) == _meta_dialog(DIALOG, system_block=True)
    png = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 30, 30)).save(png, format="PNG")
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    text = processor.apply_chat_template(with_image, add_generation_prompt=True, date_string=DATE)
    # with an image the template writes no system block, as Meta's format
    assert tok.encode(text, add_special_tokens=False) == _meta_dialog(with_image, system_block=False,
                                                                       image=png.getvalue())


# --- the datasets' prompts with the real tokenizer, as llama-cookbook tokenises them ---

def _cookbook_prompt_answer(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """samsum / grammar in llama-cookbook: encode(bos + prompt) + encode(answer + eos), no specials added."""
    p = tok.encode(tok.bos_token + prompt, add_special_tokens=False)
    a = tok.encode(answer + tok.eos_token, add_special_tokens=False)
    return p + a, [IGNORE] * len(p) + a


def test_alpaca_samsum_grammar_tokenise_as_the_cookbook(make_config, llama3_tokenizer, tmp_path):
    tok = llama3_tokenizer
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Summarise.", "input": "Cats sleep 16 hours a day.", "output": "Cats sleep a lot."}] * 20
    cfg = make_config("alpaca_dataset")
    cfg.dataset_config.data_path = str(tmp_path / "alpaca.json")
    Path(cfg.dataset_config.data_path).write_text(json.dumps(rows))
    test, train = load_split(cfg, tok, "test"), load_split(cfg, tok, "train")
    assert (len(test.samples), len(train.samples)) == (2, 38)  # the cookbook's n // 20
    for sample, row in ((test.samples[0], rows[0]), (train.samples[-1], rows[-1])):
        prompt = alpaca_prompt(row)  # cookbook: encode(prompt) / encode(prompt + output) + [eos]
        ids = tok.encode(prompt + row["output"]) + [tok.eos_token_id]
        n_prompt = len(tok.encode(prompt))
        assert sample["input_ids"] == ids and ids[0] == 128000 and ids[-1] == 128009
        assert sample["labels"] == [IGNORE] * n_prompt + ids[n_prompt:]

    samsum = [{"id": str(i), "dialogue": f"Ann: lunch at {i}?\r\nBob: sure 👍", "summary": f"Lunch at {i}."}
              for i in range(20)]
    cfg = make_config("samsum_dataset", eval_fraction=0.1)
    cfg.dataset_config.data_path = str(tmp_path / "samsum.json")
    Path(cfg.dataset_config.data_path).write_text(json.dumps(samsum))
    sample = load_split(cfg, tok, "test").samples[1]
    ids, labels = _cookbook_prompt_answer(tok, SAMSUM_PROMPT.format(dialog=samsum[1]["dialogue"]), samsum[1]["summary"])
    assert (sample["input_ids"], sample["labels"]) == (ids, labels)

    import csv

    train_csv = tmp_path / "grammar_train.csv"
    with train_csv.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["input", "target"], ["she go to school", "She goes to school."]])
    cfg = make_config("grammar_dataset")
    cfg.dataset_config.train_split = cfg.dataset_config.test_split = str(train_csv)
    sample = load_split(cfg, tok, "train").samples[0]
    ids, labels = _cookbook_prompt_answer(tok, GRAMMAR_PROMPT.format(input="she go to school"), "She goes to school.")
    assert (sample["input_ids"], sample["labels"]) == (ids, labels)
