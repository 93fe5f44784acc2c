"""``--dataset chat_dataset``: OpenAI and ShareGPT rows rendered with the real Llama 3.2 Instruct
and Vision templates and a ChatML template, masks from the renderings, bad rows, over-long
conversations and where the template comes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardtune.config import ShardtuneError
from shardtune.data import load_split
from shardtune.data.registry import adopt_dataset_template

IGNORE = -100
TEMPLATES = Path(__file__).parent / "chat_templates"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _conversations() -> list[list[dict]]:
    """OpenAI-style messages: a system message, several turns, content as parts, a tool call
    (arguments as OpenAI sends them: a JSON string) and its result."""
    return [
        [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": "What colour is the sky?"},
         {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Name a fruit."},
         {"role": "assistant", "content": "Apple."},
         {"role": "user", "content": [{"type": "text", "text": "Another "}, {"type": "text", "text": "one?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Pear."}]}],
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
         {"role": "assistant", "content": "Sunny and 21 degrees."}],
    ]


def _normalised(messages: list[dict]) -> list[dict]:
    """What the template is given: text parts joined, tool arguments an object, no None values."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        m.setdefault("content", "")
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def _sharegpt(messages: list[dict]) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}
    out = []
    for m in messages:
        turn = {"from": names[m["role"]], "value": m["content"]}
        if "tool_calls" in m:
            turn["tool_calls"] = m["tool_calls"]
        out.append(turn)
    return out


def _write(path: Path, rows: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def _cfg(make_config, path: Path, **chat):
    cfg = make_config("chat_dataset", eval_fraction=0.25, **{k: chat.pop(k) for k in list(chat)
                                                            if k in ("context_length", "skip_bad_rows", "overlong")})
    cfg.dataset_config.data_path = str(path)
    for key, value in chat.items():
        setattr(cfg.dataset_config, key, value)
    return cfg


def _runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The trained tokens, decoded, one string per run of consecutive trained tokens."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def _llama_answers(messages: list[dict]) -> list[str]:
    """Each assistant turn as Llama 3.2's template writes it, with its <|eot_id|>."""
    out = []
    for m in _normalised(messages):
        if m["role"] != "assistant":
            continue
        if "tool_calls" in m:
            call = m["tool_calls"][0]["function"]
            out.append(f'{{"name": "{call["name"]}", "parameters": {json.dumps(call["arguments"])}}}<|eot_id|>')
        else:
            out.append(m["content"].strip() + "<|eot_id|>")
    return out


def _rows(n_copies: int = 2) -> list[list[dict]]:
    return [c for _ in range(n_copies) for c in _conversations()]


def test_llama32_instruct_openai_and_sharegpt_rows(make_config, llama3_tokenizer, tmp_path):
    """input_ids are apply_chat_template(messages), the trained tokens are exactly each assistant
    answer (tool call included) with its <|eot_id|>, and ShareGPT rows give the same samples."""
    tok = llama3_tokenizer
    convs = _rows()
    openai = _write(tmp_path / "openai.jsonl", [{"messages": c} for c in convs])
    sharegpt = _write(tmp_path / "sharegpt.json", [{"conversations": _sharegpt(c)} for c in convs])
    table = tmp_path / "sharegpt.parquet"  # as datasets writes it: missing keys become nulls
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"conversations": _sharegpt(_normalised(c))} for c in convs]), table)
    a = load_split(_cfg(make_config, openai), tok, "train")
    b = load_split(_cfg(make_config, sharegpt), tok, "train")
    assert a.samples == b.samples == load_split(_cfg(make_config, table), tok, "train").samples
    assert len(a.samples) == len(convs) - 1 == a.report.samples  # eval_fraction 0.25 of 6 rows: 1
    for sample, messages in zip(a.samples, convs[1:]):
        assert sample["input_ids"] == tok.apply_chat_template(_normalised(messages), return_dict=False)
        assert _runs(tok, sample["input_ids"], sample["labels"]) == _llama_answers(messages)
    test = load_split(_cfg(make_config, openai), tok, "test")  # the file's first row
    assert len(test.samples) == 1 and test.samples[0]["input_ids"] == tok.apply_chat_template(_normalised(convs[0]), return_dict=False)


def test_train_on_last_and_all(make_config, llama3_tokenizer, tmp_path):
    tok = llama3_tokenizer
    path = _write(tmp_path / "c.jsonl", [{"messages": c} for c in _rows()])
    last = load_split(_cfg(make_config, path, train_on="last"), tok, "train")
    every = load_split(_cfg(make_config, path, train_on="all"), tok, "train")
    for s_last, s_all, messages in zip(last.samples, every.samples, _rows()[1:]):
        assert _runs(tok, s_last["input_ids"], s_last["labels"]) == _llama_answers(messages)[-1:]
        assert s_all["labels"] == s_all["input_ids"] == s_last["input_ids"]


def test_tools_go_to_the_template(make_config, llama3_tokenizer, tmp_path):
    """A row's tools (a list, or LLaMA-Factory's JSON string) are rendered by the template."""
    tok = llama3_tokenizer
    conv = _conversations()[2]
    rows = [{"messages": conv, "tools": [WEATHER]}, {"conversations": _sharegpt(conv), "tools": json.dumps([WEATHER])}] * 2
    split = load_split(_cfg(make_config, _write(tmp_path / "t.jsonl", rows)), tok, "train")
    want = tok.apply_chat_template(_normalised(conv), tools=[WEATHER], return_dict=False)
    assert [s["input_ids"] for s in split.samples] == [want] * 3
    assert "get_weather" in tok.decode(want[:want.index(128009, want.index(128009) + 1)])  # in the first user turn
    assert _runs(tok, want, split.samples[0]["labels"]) == _llama_answers(conv)


@pytest.fixture(scope="module")
def chatml_tokenizer(llama3_tokenizer_dir):
    """The Llama 3 tokenizer with ChatML's markers added as special tokens and the ChatML template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (TEMPLATES / "chatml.jinja").read_text()
    return tok


def test_chatml_masks_equal_transformers_assistant_mask(make_config, chatml_tokenizer, tmp_path):
    """Another family's template: each answer and its <|im_end|> are trained (not the newline the
    model never generates), and the mask equals the one transformers computes from the template's
    {% generation %} markers, which is TRL's assistant_only_loss."""
    tok = chatml_tokenizer
    convs = _rows()[:2] + _rows()[3:5]  # no tool calls: this ChatML template has no tool syntax
    split = load_split(_cfg(make_config, _write(tmp_path / "c.json", [{"messages": c} for c in convs])), tok, "train")
    assert len(split.samples) == 3
    for sample, messages in zip(split.samples, convs[1:]):
        peer = tok.apply_chat_template(_normalised(messages), return_dict=True, return_assistant_tokens_mask=True)
        assert sample["input_ids"] == peer["input_ids"]
        assert [int(lab != IGNORE) for lab in sample["labels"]] == peer["assistant_masks"]
        answers = [m["content"] + "<|im_end|>" for m in _normalised(messages) if m["role"] == "assistant"]
        assert _runs(tok, sample["input_ids"], sample["labels"]) == answers


def test_template_file_and_no_template(make_config, llama3_tokenizer_dir, tiny_tokenizer, tmp_path):
    """--chat_dataset.chat_template renders the rows and becomes the tokenizer's (so the saved
    model carries it); without any template the error names both ways to give one."""
    from transformers import AutoTokenizer

    path = _write(tmp_path / "c.jsonl", [{"messages": c} for c in _rows()[:4]])
    cfg = _cfg(make_config, path)
    assert tiny_tokenizer.chat_template is None
    with pytest.raises(ShardtuneError, match=r"(?s)no chat_template.*--chat_dataset\.chat_template FILE.*--tokenizer_name"):
        load_split(cfg, tiny_tokenizer, "train")
    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    chatml = TEMPLATES / "chatml.jinja"
    cfg.dataset_config.chat_template = str(chatml)
    split = load_split(cfg, tok, "train")
    assert split.samples[0]["input_ids"] == tok.apply_chat_template(
        _normalised(_rows()[1]), chat_template=chatml.read_text(), return_dict=False)
    assert tok.chat_template != chatml.read_text()  # loading does not change the tokenizer...
    line = adopt_dataset_template(cfg, tok)  # ...the recipe does, so the output carries the template
    assert tok.chat_template == chatml.read_text() and "replaces the tokenizer's own" in line
    tok.save_pretrained(tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == chatml.read_text()
    cfg.dataset_config.chat_template = str(tmp_path / "missing.jinja")
    with pytest.raises(ShardtuneError, match="missing.jinja: the file does not exist"):
        load_split(cfg, tok, "train")


BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "has no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     r"message 1 \(assistant\) with empty content"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}, "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Yo"}]}, "unknown from 'robot'"),
    ({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "Yo"}]},
     r"message 0 \(user\) with content of type int"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "a", "arguments": "{}"}}, {"function": {"name": "b", "arguments": "{}"}}]}]},
     r"refused by the chat template .*only supports single tool-calls"),
    ({"text": "Hi"}, "must hold one of 'messages'"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                   {"role": "assistant", "content": "Yo"}], "images": ["x.png"]}, "the model is a text model"),
]


@pytest.mark.parametrize("row,reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_rows_name_file_and_line(make_config, llama3_tokenizer, tmp_path, row, reason):
    good = [{"messages": c} for c in _rows()]
    path = _write(tmp_path / "c.jsonl", good[:4] + [row] + good[4:])
    with pytest.raises(ShardtuneError, match=rf"(?s)c\.jsonl, row 4, line 5 .*{reason}.*--skip_bad_rows"):
        load_split(_cfg(make_config, path), llama3_tokenizer, "train")
    split = load_split(_cfg(make_config, path, skip_bad_rows=True), llama3_tokenizer, "train")
    assert split.report.skipped_bad == 1 and split.report.samples == 5


def test_overlong_drop_and_cut_at_turn(make_config, llama3_tokenizer, tmp_path):
    """Over-long conversations: dropped with --overlong drop, or cut after the last whole
    assistant turn that fits with --chat_dataset.cut_at_turn (the system message kept), rendered
    again by the template; one whose first answer does not fit is dropped. All counted."""
    tok = llama3_tokenizer
    long = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        long += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    huge = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Fine."}]
    short = _conversations()[0]
    rows = [{"messages": m} for m in (short, short, long, huge)]
    path = _write(tmp_path / "c.jsonl", rows)
    n_long = len(tok.apply_chat_template(long, return_dict=False))
    keep = long[:7]  # system + 3 exchanges
    limit = len(tok.apply_chat_template(keep, return_dict=False)) + 3
    assert limit < n_long
    dropped = load_split(_cfg(make_config, path, context_length=limit, overlong="drop"), tok, "train")
    assert (dropped.report.dropped_overlong, dropped.report.samples) == (2, 1)
    cut = load_split(_cfg(make_config, path, context_length=limit, cut_at_turn=True), tok, "train")
    assert (cut.report.truncated, cut.report.dropped_overlong, cut.report.samples) == (1, 1, 2)
    sample = cut.samples[1]
    assert sample["input_ids"] == tok.apply_chat_template(keep, return_dict=False)
    assert _runs(tok, sample["input_ids"], sample["labels"]) == _llama_answers(keep)


def test_folder_splits(make_config, llama3_tokenizer, tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    _write(folder / "train.jsonl", [{"messages": c} for c in _rows()])
    _write(folder / "test.json", [{"conversations": _sharegpt(c)} for c in _conversations()[:1]])
    cfg = _cfg(make_config, folder)
    assert len(load_split(cfg, llama3_tokenizer, "train").samples) == 6
    assert len(load_split(cfg, llama3_tokenizer, "test").samples) == 1
    cfg.dataset_config.test_split = "validation"
    with pytest.raises(ShardtuneError, match=r"no file for the 'validation' split"):
        load_split(cfg, llama3_tokenizer, "test")


def test_hub_name_offline_is_a_clear_error(make_config, llama3_tokenizer):
    pytest.importorskip("datasets")  # offline: tests/conftest.py sets HF_HUB_OFFLINE
    cfg = _cfg(make_config, Path("someone/no-such-chat-dataset"))
    with pytest.raises(ShardtuneError, match=r"Could not load the chat dataset 'someone/no-such-chat-dataset' split "
                                             r"'train' from the Hugging Face Hub.*\.jsonl"):
        load_split(cfg, llama3_tokenizer, "train")


# --- Llama 3.2 Vision ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vision_processor(real_vocab_vision_model_dir):
    """The processor the recipe loads for the real-vocabulary tiny Llama 3.2 Vision model: the real
    Llama 3 tokenizer + <|image|> and the Llama 3.2 Vision Instruct template."""
    from shardtune.model.loading import load_inputs

    return load_inputs(str(real_vocab_vision_model_dir))


def _vision_rows(names: list[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(names):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is picture {i}?"}]},
                    {"role": "assistant", "content": f"Picture {i}."}]
        if i % 2:
            messages += [{"role": "user", "content": "Are you sure?"},
                         {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]
        rows.append({"messages": messages, "images": [name]})
    return rows


def test_vision_conversations_go_through_the_processor(make_config, vision_processor, write_images, tmp_path):
    """Image conversations for Llama 3.2 Vision: the ids are processor.apply_chat_template's (the
    image given in its part, as the processor loads it), each answer and its <|eot_id|> are
    trained, the images are kept as references."""
    proc, tok = vision_processor, vision_processor.tokenizer
    rows = _vision_rows(write_images(4))
    split = load_split(_cfg(make_config, _write(tmp_path / "v.jsonl", rows)), proc, "train")
    assert len(split.samples) == 3 and split.collate_fn is not None
    for sample, row in zip(split.samples, rows[1:]):
        messages = json.loads(json.dumps(row["messages"]))
        messages[0]["content"][0]["path"] = str(tmp_path / row["images"][0])
        want = proc.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][0]
        assert sample["input_ids"] == want
        assert sample["images"] == [str((tmp_path / row["images"][0]).resolve())]
        answers = [(m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]) + "<|eot_id|>"
                   for m in row["messages"] if m["role"] == "assistant"]
        assert _runs(tok, sample["input_ids"], sample["labels"]) == answers
    batch = split.collate_fn(split.samples)
    assert batch["pixel_values"].shape[0] == 3 and batch["labels"].shape == batch["input_ids"].shape


def test_vision_rows_without_images_or_with_a_system_message_are_bad(make_config, vision_processor, write_images,
                                                                     tmp_path):
    rows = _vision_rows(write_images(4))
    text_only = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    with_system = {**rows[0], "messages": [{"role": "system", "content": "Be brief."}, *rows[0]["messages"]]}
    for bad, reason in ((text_only, "has no image"), (with_system, "incompatible with system messages")):
        path = _write(tmp_path / "v.jsonl", rows[:2] + [bad] + rows[2:])
        with pytest.raises(ShardtuneError, match=rf"(?s)v\.jsonl, row 2, line 3 .*{reason}"):
            load_split(_cfg(make_config, path), vision_processor, "train")


def test_vision_conversation_cut_at_a_turn_keeps_its_image(make_config, vision_processor, write_images, tmp_path):
    """--chat_dataset.cut_at_turn on an image conversation: its first exchange, image included."""
    proc = vision_processor
    rows = _vision_rows(write_images(4))  # rows 1 and 3 have two exchanges
    first = {**rows[1], "messages": rows[1]["messages"][:2]}
    fits = len(chat_encode(proc, first, tmp_path)["input_ids"])
    path = _write(tmp_path / "v.jsonl", rows)
    split = load_split(_cfg(make_config, path, context_length=fits, cut_at_turn=True), proc, "train")
    assert (split.report.truncated, split.report.samples) == (2, 3)
    assert split.samples[0] == chat_encode(proc, first, tmp_path)
    assert len(split.samples[0]["images"]) == 1


def chat_encode(proc, row: dict, base: Path) -> dict:
    """One row encoded as chat_dataset does, with the processor's own template and no length limit."""
    from shardtune.config import ChatTrainOn
    from shardtune.config.configs import chat_dataset as chat_config
    from shardtune.data.chat_dataset import Encoder, encode, resolve_template

    return encode(row, Encoder(proc, resolve_template(chat_config(), proc), ChatTrainOn.assistant, 4096, False, base))


def test_ocrvqa_rows_are_chat_rows(vision_processor, write_images, tmp_path):
    """The cookbook's OCR-VQA format is a special case: its row and the same conversation as a
    chat row encode to the same sample."""
    from shardtune.config import ChatTrainOn
    from shardtune.data import chat_dataset, vision

    proc = vision_processor
    names = write_images(2)
    turns = [("What is shown?", "A block."), ("Which colour?", "Red.")]
    ocrvqa_row = {"images": names, "texts": [{"user": u, "assistant": a} for u, a in turns]}
    chat_row = {"messages": vision.messages(turns, n_images=2), "images": names}
    template = vision.chat_template(proc)
    enc = chat_dataset.Encoder(proc, template, ChatTrainOn.assistant, 4096, False, tmp_path)
    assert chat_dataset.encode(chat_row, enc) == vision.encode(ocrvqa_row, proc, template, tmp_path)


# --- peer check: TRL's assistant_only_loss ----------------------------------------------------

@pytest.mark.slow  # 2-6 minutes here: TRL's SFTTrainer in a subprocess, twice
@pytest.mark.peer  # SHARDTUNE_PEER_SMOKE=1 runs it (tests/conftest.py)
def test_masks_equal_trls_assistant_only_loss(make_config, llama3_chat_model_dir, llama3_tokenizer_dir, trl_path,
                                              tmp_path):
    """On the same rows and template, the samples are TRL SFTTrainer's with assistant_only_loss=True
    (the ids, and the labels for Meta's Llama 3 Instruct template), with Meta's Llama 3 template and
    Qwen 2.5's ChatML template with tool calls, whose {% generation %} training copies TRL ships.
    TRL's Qwen 2.5 copy also trains two newlines the model never generates (the one that ends the
    generation prompt "<|im_start|>assistant\n", and the one after <|im_end|>); ours does not,
    and that is the only difference."""
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer

    convs = [_normalised(c) for c in _conversations()]
    cases = {"llama3": ([{"messages": c} for c in convs[:2]], []),
             "qwen2_5": ([{"messages": c, "tools": [WEATHER]} for c in convs], ["<|im_start|>", "<|im_end|>"])}
    jobs, ours = [], {}
    for name, (rows, specials) in cases.items():
        template = trl_path / "trl" / "chat_templates" / f"{name}.jinja"
        tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.chat_template = template.read_text()
        tok.save_pretrained(tmp_path / name)
        data = _write(tmp_path / f"{name}.jsonl", [rows[0]] + rows)  # the first row is the eval split
        ours[name] = load_split(_cfg(make_config, data, chat_template=str(template)), tok, "train").samples
        jobs.append({"tokenizer": str(tmp_path / name), "rows": rows, "out": str(tmp_path / f"{name}.out.json")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(trl_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "trl_peer.py"), str(llama3_chat_model_dir),
                           str(tmp_path / "jobs.json"), str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, job in zip(cases, jobs):
        peer = json.loads(Path(job["out"]).read_text())
        assert [s["input_ids"] for s in ours[name]] == [p["input_ids"] for p in peer], name
        if name == "llama3":
            assert [s["labels"] for s in ours[name]] == [p["labels"] for p in peer], name
            continue
        (newline,) = AutoTokenizer.from_pretrained(tmp_path / name).encode("\n", add_special_tokens=False)
        for sample, theirs, messages in zip(ours[name], peer, convs):
            extra = [i for i, (a, b) in enumerate(zip(sample["labels"], theirs["labels"])) if a != b]
            assert all(sample["labels"][i] == IGNORE and theirs["labels"][i] == sample["input_ids"][i] == newline
                       for i in extra)
            assert len(extra) == 2 * sum(m["role"] == "assistant" for m in messages)  # two per assistant turn


def test_no_data_path_is_refused_before_any_work(make_config):
    from shardtune.data import check_data_source

    cfg = make_config("chat_dataset")
    with pytest.raises(ShardtuneError, match=r"(?s)needs --chat_dataset\.data_path.*\"messages\".*\"conversations\""):
        check_data_source(cfg)


@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_shardtune_data_shows_the_template_rendering_and_the_assistant_spans(llama3_chat_model_dir, llama3_tokenizer,
                                                                              tmp_path, capfd, train_on):
    """`shardtune data --show all --json` on a Llama 3.2 Instruct conversation file, as a user runs
    it on the model folder: every sample's input_ids are apply_chat_template(messages) and its
    trained tokens are exactly the assistant answers (all of them, or the last)."""
    from shardtune import cli

    tok, convs = llama3_tokenizer, _rows()
    path = _write(tmp_path / "chats.jsonl", [{"messages": c} for c in convs])
    capfd.readouterr()
    cli.main(["data", "--model_name", str(llama3_chat_model_dir), "--dataset", "chat_dataset",
              "--chat_dataset.data_path", str(path), "--chat_dataset.train_on", train_on,
              "--eval_fraction", "0.25", "--batching_strategy", "padding", "--batch_size_training", "1",
              "--show", "all", "--json"])
    shown = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert len(shown) == len(convs) - 1  # the first row is the eval split
    for sample, messages in zip(shown, convs[1:]):
        assert sample["input_ids"] == tok.apply_chat_template(_normalised(messages), return_dict=False)
        answers = _llama_answers(messages)
        assert _runs(tok, sample["input_ids"], sample["labels"]) == (answers if train_on == "assistant" else answers[-1:])
