"""``generate --chat`` and ``shardtune chat`` with the real Llama 3 tokenizer and Llama 3.2
Instruct's chat template (tests/data/chat_templates): the prompt is what ``apply_chat_template``
renders, and generation stops at the Instruct model's end-of-turn ids."""

from __future__ import annotations


import pytest
import torch

from shardtune.infer.generate import Sampling, chat_text, generate_batch
from shardtune.infer.loading import load_for_inference
from shardtune.infer.prompts import Prompt


@pytest.fixture(scope="module")
def loaded(llama3_chat_model_dir):
    return load_for_inference(str(llama3_chat_model_dir), dtype=torch.float32)


def _reference(model, tok, messages, max_new_tokens):
    """transformers' own way: apply_chat_template's ids, greedy, stopping at the generation config's ids."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_prompts_render_through_the_instruct_template(loaded):
    model, tok = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert chat_text(tok, messages) == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(chat_text(tok, messages), add_special_tokens=False)["input_ids"]
    assert ids[0] == 128000 and ids.count(128000) == 1  # one BOS: the template's
    assert ids[-4:] == [128006, tok.convert_tokens_to_ids("assistant"), 128007, tok.encode("\n\n", add_special_tokens=False)[0]]
    one = [{"role": "user", "content": "Name a colour."}]
    expected = _reference(model, tok, one, 6)
    assert generate_batch(model, tok, [Prompt(text="Name a colour.")], Sampling(max_new_tokens=6), chat=True) == [expected]
    assert generate_batch(model, tok, [Prompt(messages=messages)], Sampling(max_new_tokens=6)) == [
        _reference(model, tok, messages, 6)]
    # two prompts of different lengths in one left-padded batch (Llama 3.2 Instruct has no pad token)
    batched = generate_batch(model, tok, [Prompt(text="Name a colour."), Prompt(text="Hi")],
                             Sampling(max_new_tokens=6), chat=True, batch_size=2)
    assert batched == [expected, _reference(model, tok, [{"role": "user", "content": "Hi"}], 6)]


def test_cli_generate_chat_with_the_real_template(llama3_chat_model_dir, loaded, shardtune_cli):
    model, tok = loaded
    proc = shardtune_cli(["generate", str(llama3_chat_model_dir), "--chat", "--prompt", "Name a colour.",
                          "--max_new_tokens", "6"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reply = _reference(model, tok, [{"role": "user", "content": "Name a colour."}], 6)
    assert proc.stdout == f"{reply}\n"  # one prompt: the answer alone
