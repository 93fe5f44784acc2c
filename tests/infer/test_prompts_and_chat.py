"""Prompt sources (``--prompt``, ``--prompt_file`` text or JSONL, stdin), batched generation with
left padding, the chat template (``--chat``), sampling settings and ``shardtune chat`` driven
through stdin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from shardtune.config.errors import ShardtuneError
from shardtune.infer.chat import ChatSession, run_session
from shardtune.infer.generate import Sampling, chat_text, generate_batch
from shardtune.infer.loading import load_for_inference
from shardtune.infer.prompts import Prompt, parse_lines, read_prompt_file

# A chat template over the tiny tokenizer's own tokens (it has no chat markers).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with a chat template saved in its tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chat-model") / "model"
    shutil.copytree(tiny_model_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(chat_model):
    return load_for_inference(str(chat_model), dtype=torch.float32)


def test_prompt_files_text_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second one  \n")
    assert [p.text for p in read_prompt_file(str(txt))] == ["first prompt", "  second one  "]
    rows = [{"prompt": "plain"}, {"messages": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hi"}]},
            {"prompt": "about a picture", "image": "img/a.png"}]
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_prompt_file(str(jl))
    assert got[0].text == "plain" and got[1].messages == rows[1]["messages"] and got[1].shown == "hi"
    assert got[2].image == str(tmp_path / "img" / "a.png")  # relative to the file
    assert [p.text for p in parse_lines(["a\n", "b\n"], "stdin")] == ["a", "b"]


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "ok"}\n{"prompt": \n', r"line 2: not valid JSON"),
    ('{"text": "x"}\n', r"line 1: each row must be an object with either \"prompt\" or \"messages\""),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"line 1: message 0 must be an object with \"role\""),
    ('{"prompt": ""}\n', r"non-empty string"),
    ("\n\n", r"holds no prompt"),
])
def test_bad_prompt_files_are_clear_errors(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ShardtuneError, match=message):
        read_prompt_file(str(f))
    with pytest.raises(ShardtuneError, match="does not exist"):
        read_prompt_file(str(tmp_path / "missing.txt"))


def test_batched_left_padded_generation_equals_one_at_a_time(loaded):
    model, tok = loaded
    prompts = [Prompt(text=t) for t in ("a", "The quick brown fox jumps over", "b c d", "Spell 12.")]
    one = generate_batch(model, tok, prompts, Sampling(max_new_tokens=10), batch_size=1)
    batched = generate_batch(model, tok, prompts, Sampling(max_new_tokens=10), batch_size=4)
    assert batched == one and any(one)
    assert tok.padding_side == "right"  # the tokenizer's own setting is left alone


def test_chat_template_is_applied(loaded):
    model, tok = loaded
    messages = [{"role": "user", "content": "hello there"}]
    text = chat_text(tok, messages)
    assert text.endswith("user: hello there\nassistant:")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generate_batch(model, tok, [Prompt(text="hello there")], Sampling(max_new_tokens=6), chat=True) == [expected]
    assert generate_batch(model, tok, [Prompt(messages=messages)], Sampling(max_new_tokens=6)) == [expected]


def test_sampling_is_seeded_and_options_are_checked(loaded):
    model, tok = loaded
    prompts = [Prompt(text="a b c")]
    s = Sampling(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=3)
    assert generate_batch(model, tok, prompts, s) == generate_batch(model, tok, prompts, s)
    others = {generate_batch(model, tok, prompts, Sampling(12, 1.5, 0.95, 50, 1.1, seed))[0] for seed in range(4)}
    assert len(others) > 1  # the seed matters when sampling
    for bad, message in [(Sampling(top_k=5), "only apply when sampling"), (Sampling(top_k=-1), "--top_k"),
                         (Sampling(repetition_penalty=0), "--repetition_penalty"),
                         (Sampling(max_new_tokens=0), "--max_new_tokens")]:
        with pytest.raises(ShardtuneError, match=message):
            bad.check()


def test_a_tokenizer_without_chat_template_is_refused_for_chat(tiny_model_dir):
    model, tok = load_for_inference(str(tiny_model_dir), dtype=torch.float32)
    with pytest.raises(ShardtuneError, match="needs a tokenizer with a chat template"):
        generate_batch(model, tok, [Prompt(text="hi")], chat=True)
    with pytest.raises(ShardtuneError, match="needs a tokenizer with a chat template"):
        ChatSession(model, tok, Sampling())


def test_chat_session_keeps_history_and_resets(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, Sampling(max_new_tokens=5), system="be brief")
    lines = iter(["hello", "and again", "/reset", "hello", "/exit", "never read"])
    said: list[str] = []

    def read() -> str:
        return next(lines)

    run_session(session, read, said.append)
    assert said[2] == "(conversation cleared)"
    assert said[3] == said[0]  # after /reset the first question gets the first answer again
    assert next(lines) == "never read"  # /exit ended the loop
    assert session.history[0] == {"role": "system", "content": "be brief"} and len(session.history) == 3


def test_chat_drops_the_oldest_turns_when_the_context_is_full(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, Sampling(max_new_tokens=4), system="sys")
    session.budget = 40  # a tiny context, so two exchanges no longer fit
    notes: list[str] = []
    for question in ("one two three four five six", "seven eight nine ten", "eleven twelve"):
        session.ask(question, note=notes.append)
    assert notes and "dropped" in notes[0]
    assert session.history[0]["role"] == "system" and session.history[-2]["content"] == "eleven twelve"


def test_cli_chat_and_generate_through_stdin(chat_model, loaded, shardtune_cli):
    model, tok = loaded
    chat = shardtune_cli(["chat", str(chat_model), "--max_new_tokens", "5"], input="hello\n/reset\nhello\n/exit\n",
                         timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    reply = generate_batch(model, tok, [Prompt(text="hello")], Sampling(max_new_tokens=5), chat=True)[0]
    assert chat.stdout.splitlines() == [reply, "(conversation cleared)", reply]
    gen = shardtune_cli(["generate", str(chat_model), "--max_new_tokens", "5"], input="a b c\nhello\n", timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    expected = generate_batch(model, tok, [Prompt(text="a b c"), Prompt(text="hello")], Sampling(max_new_tokens=5))
    assert gen.stdout == "".join(f"[{i}] {p}\n{c}\n\n" for i, (p, c) in enumerate(zip(["a b c", "hello"], expected), 1))


def test_cli_chat_with_stdin_closed_ends_like_empty_input(chat_model):
    """`shardtune chat MODEL <&-`: Python's sys.stdin is None; that is the end of input, not an
    AttributeError traceback."""
    chat = subprocess.run(["bash", "-c", 'exec "$0" -m shardtune chat "$1" --max_new_tokens 5 <&-',
                           sys.executable, str(chat_model)], capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "Traceback" not in chat.stderr and chat.stdout == "", chat.stderr[-3000:]
