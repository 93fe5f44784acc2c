"""--dataset preference_dataset (data/preference.py): string and conversational pairs, bad rows,
the context-length policy per pair, the one-batch collator and the --use_dpo refusals."""

from __future__ import annotations

import json

import pytest
import torch

from shardtune.config import ConfigError, ShardtuneError, parse_args
from shardtune.data import build_dataloader, load_split
from shardtune.data.fingerprint import rows_fingerprint
from shardtune.data.preference import PreferenceCollator, encode
from shardtune.batches import IGNORE_INDEX
from shardtune.data.rows import BadRow
from shardtune.train.dpo import PreferenceObjective, valid_pairs

# A small chat template of the usual shape (a header per message, an end-of-turn token after it).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def chat_tokenizer(tokenizer):
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"No idea {i}."}
            for i in range(n)]


def _cfg(path, *extra: str):
    return parse_args(["--dataset", "preference_dataset", "--preference_dataset.data_path", str(path), "--use_dpo",
                       "--batching_strategy", "padding", "--context_length", "64", *extra]).config


def test_string_pair_is_bos_prompt_response_eos_with_labels_on_the_response(tokenizer):
    pair = encode({"prompt": "Say hi.", "chosen": "Hi there.", "rejected": "No."}, tokenizer)
    prompt = tokenizer.encode(tokenizer.bos_token + "Say hi.", add_special_tokens=False)
    for name, text in (("chosen", "Hi there."), ("rejected", "No.")):
        s = pair[name]
        answer = tokenizer.encode(text + tokenizer.eos_token, add_special_tokens=False)
        assert s["input_ids"] == prompt + answer
        assert s["input_ids"][0] == tokenizer.bos_token_id and s["input_ids"][-1] == tokenizer.eos_token_id
        assert s["labels"] == [IGNORE_INDEX] * len(prompt) + answer


@pytest.mark.parametrize("form", ["shared_prefix", "prompt_messages", "prompt_string"])
def test_conversational_pair_is_rendered_by_the_chat_template_and_masks_the_prompt(chat_tokenizer, form):
    user = {"role": "user", "content": "Say hi."}
    good, bad = {"role": "assistant", "content": "Hi there."}, {"role": "assistant", "content": "No."}
    row = {"shared_prefix": {"chosen": [user, good], "rejected": [user, bad]},
           "prompt_messages": {"prompt": [user], "chosen": [good], "rejected": [bad]},
           "prompt_string": {"prompt": "Say hi.", "chosen": [good], "rejected": [bad]}}[form]
    pair = encode(row, chat_tokenizer)
    render = lambda msgs, gen=False: chat_tokenizer(  # noqa: E731
        chat_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen),
        add_special_tokens=False)["input_ids"]
    prompt = render([user], gen=True)
    for name, reply in (("chosen", good), ("rejected", bad)):
        s = pair[name]
        assert s["input_ids"] == render([user, reply])
        n = len(prompt)
        assert s["input_ids"][:n] == prompt and s["labels"][:n] == [IGNORE_INDEX] * n
        trained = [t for t in s["labels"] if t != IGNORE_INDEX]
        assert trained == s["input_ids"][n:] and trained[-1] == chat_tokenizer.eos_token_id  # the end of turn


@pytest.mark.parametrize("row,why", [
    ({"prompt": "p", "chosen": "a"}, "no field 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": ["x"]}, "both must be strings"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "without a preference"),
    ({"chosen": "a", "rejected": "b"}, "no field 'prompt'"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "r"}]}, "no prompt"),
    ({"prompt": "q", "chosen": [{"content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "not a chat message"),
])
def test_bad_rows_say_what_is_wrong(chat_tokenizer, row, why):
    with pytest.raises(BadRow, match=why):
        encode(row, chat_tokenizer)


def test_a_bad_row_names_file_and_line_or_is_skipped_and_counted(tokenizer, tmp_path):
    rows = _pairs(30)
    rows[25] = {"prompt": "q", "chosen": "only one"}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ShardtuneError, match=r"pairs.jsonl, row 25, line 26 .*'rejected'.*--skip_bad_rows"):
        load_split(_cfg(path), tokenizer, "train")  # the first row (5% of 30, at least 1) is the eval split
    split = load_split(_cfg(path, "--skip_bad_rows"), tokenizer, "train")
    assert split.report.skipped_bad == 1 and len(split.samples) == 28


def test_conversational_rows_without_a_chat_template_are_a_file_error(tokenizer, tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                 "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
                                ] * 4))
    with pytest.raises(ShardtuneError, match="no chat template"):
        load_split(_cfg(path), tokenizer, "train")


def test_overlong_pairs_are_dropped_or_truncated_as_one_example(tokenizer, tmp_path):
    rows = _pairs(20)
    rows[10]["rejected"] = "word " * 200  # only the rejected response is too long
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))
    dropped = load_split(_cfg(path, "--overlong", "drop"), tokenizer, "train")
    assert dropped.report.dropped_overlong == 1 and len(dropped.samples) == 18
    cut = load_split(_cfg(path), tokenizer, "train")
    assert cut.report.truncated == 1 and len(cut.samples) == 19
    assert all(len(s[k]["input_ids"]) <= 64 for s in cut.samples for k in ("chosen", "rejected"))


def test_collator_puts_chosen_then_rejected_in_one_padded_batch_and_fillers_are_no_pairs(tokenizer, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(_pairs(21)))
    split = load_split(_cfg(path), tokenizer, "train")  # 20 pairs
    loader = build_dataloader(split.samples, tokenizer=tokenizer, strategy="padding", batch_size=3,
                              context_length=64, shuffle=False, seed=0, rank=1, world_size=2, drop_last=False,
                              collate_fn=split.collate_fn)
    batches = list(loader)
    first = batches[0]
    assert first["input_ids"].shape[0] == 6 and first["labels"].shape == first["input_ids"].shape
    pairs = [split.samples[i] for i in loader.batch_sampler.global_batches()[0][3:6]]
    for j, p in enumerate(pairs):
        for row, name in ((j, "chosen"), (j + 3, "rejected")):
            n = len(p[name]["input_ids"])
            assert first["input_ids"][row, :n].tolist() == p[name]["input_ids"]
            assert (first["attention_mask"][row, n:] == 0).all() and (first["labels"][row, n:] == IGNORE_INDEX).all()
    counts = [PreferenceObjective.count(b) for b in batches]
    # 20 pairs in global batches of 6: rank 1 holds 3 of each of the first three and is a filler in the last
    assert counts == [3, 3, 3, 0] and batches[-1]["input_ids"].shape[0] == 2
    assert valid_pairs(batches[-1]["labels"]).tolist() == [False]


def test_fingerprint_tells_pairs_apart(tokenizer):
    a = encode({"prompt": "p", "chosen": "yes", "rejected": "no"}, tokenizer)
    b = encode({"prompt": "p", "chosen": "yes", "rejected": "nope"}, tokenizer)
    assert rows_fingerprint([a]) != rows_fingerprint([b])
    assert rows_fingerprint([a]) == rows_fingerprint([encode({"prompt": "p", "chosen": "yes", "rejected": "no"},
                                                             tokenizer)])


def test_collator_output_is_long_tensors(tokenizer):
    pair = encode({"prompt": "p", "chosen": "yes", "rejected": "no"}, tokenizer)
    batch = PreferenceCollator(0)([pair])
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "attention_mask"))


@pytest.mark.parametrize("args,match", [
    (["--use_dpo", "--dataset", "alpaca_dataset", "--batching_strategy", "padding"], "custom_dataset whose function"),
    (["--use_dpo", "--dataset", "preference_dataset"], "--batching_strategy padding"),
    (["--dataset", "preference_dataset", "--batching_strategy", "padding"], "add --use_dpo"),
    (["--dpo_config.beta", "0.5"], "only applies with --use_dpo"),
    (["--use_dpo", "--dataset", "preference_dataset", "--batching_strategy", "padding", "--dpo_config.beta", "0"],
     "beta must be positive"),
    (["--use_dpo", "--dataset", "preference_dataset", "--batching_strategy", "padding", "--dpo_config.loss_type",
      "ipo", "--dpo_config.label_smoothing", "0.1"], "applies to --dpo_config.loss_type sigmoid"),
    (["--use_dpo", "--dataset", "preference_dataset", "--batching_strategy", "padding", "--dpo_config.label_smoothing",
      "0.5"], "below 0.5"),
    (["--use_dpo", "--dataset", "preference_dataset", "--batching_strategy", "padding", "--run_eval_after"],
     "Remove --run_eval_after"),
])
def test_preference_options_that_cannot_work_are_refused(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(args)


def test_dpo_options_parse_flat_and_dotted():
    cfg = parse_args(["--use_dpo", "--dataset", "preference_dataset", "--batching_strategy", "padding",
                      "--beta", "0.3", "--dpo_config.loss_type", "ipo"]).config
    assert cfg.dpo.beta == 0.3 and cfg.dpo.loss_type.value == "ipo" and cfg.to_dict()["dpo_config"]["beta"] == 0.3


def test_missing_data_path_is_a_clear_error(tokenizer):
    cfg = parse_args(["--use_dpo", "--dataset", "preference_dataset", "--batching_strategy", "padding"]).config
    with pytest.raises(ShardtuneError, match="--preference_dataset.data_path FILE"):
        load_split(cfg, tokenizer, "train")


CUSTOM = '''
def get_custom_dataset(dataset_config, tokenizer, split):
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"No idea {i}."}
            for i in range(6 if split == "train" else 2)]
'''


def test_a_custom_dataset_may_return_preference_rows_under_use_dpo(tokenizer, tmp_path):
    file = tmp_path / "pairs.py"
    file.write_text(CUSTOM)
    cfg = parse_args(["--dataset", "custom_dataset", "--custom_dataset.file", str(file), "--use_dpo",
                      "--batching_strategy", "padding"]).config
    split = load_split(cfg, tokenizer, "train")
    want = encode({"prompt": "What is 1 plus 1?", "chosen": "It is 2.", "rejected": "No idea 1."}, tokenizer)
    assert len(split.samples) == 6 and split.samples[1] == want
    assert isinstance(split.collate_fn, PreferenceCollator)
    file.write_text(CUSTOM + "\ndef get_data_collator(processor):\n    return lambda rows: rows\n")
    with pytest.raises(ShardtuneError, match="Remove it from the file"):
        load_split(cfg, tokenizer, "train")
