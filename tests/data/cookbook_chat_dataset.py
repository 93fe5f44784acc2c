# A custom chat dataset written the way llama-cookbook users write them (test fixture, used through
# --custom_dataset.file). Same shape as llama-cookbook's
# getting-started/finetuning/datasets/custom_dataset.py: get_custom_dataset(dataset_config,
# tokenizer, split) returns tokenised dialogs; with a Llama 3 vocabulary (>= 128,000) a dialog is
# rendered by the tokenizer's chat template, and the labels mask the system and user turns (found
# by the end-of-turn id 128009 and the role token after each header) and the assistant headers.
# Differences from the cookbook's file: the dialogs come from a local JSON file
# (--custom_dataset.data_path: {"train": [dialog, ...], "validation": [...]}) instead of OASST1 on
# the hub, and apply_chat_template gets return_dict=False, because transformers 5 returns a
# BatchEncoding by default (the cookbook's file was written for transformers 4).

import copy
import itertools
import json

B_INST, E_INST = "[INST]", "[/INST]"
EOT_ID = 128009  # <|eot_id|>


def mask_target(target, seq):
    for i in range(len(seq) - len(target)):
        if seq[i:i + len(target)] == target:
            seq[i:i + len(target)] = [-100] * len(target)
    return seq


def tokenize_dialog(dialog, tokenizer):
    if tokenizer.vocab_size >= 128000:
        dialog_tokens = tokenizer.apply_chat_template(dialog, return_dict=False)
        eot_indices = [i for i, n in enumerate(dialog_tokens) if n == EOT_ID]
        labels = copy.copy(dialog_tokens)
        # determine token for system and user
        system_or_user = (tokenizer.encode("system")[-1], tokenizer.encode("user")[-1])
        labels[0] = -100  # bos token
        last_idx = 1
        for n, idx in enumerate(eot_indices):
            role_token = labels[last_idx + 1]
            if role_token in system_or_user:
                # Set labels to -100 for system and user tokens to ignore in loss function
                labels[last_idx:idx + 1] = [-100] * (idx - last_idx + 1)
            last_idx = idx + 1
        mask_target(tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>", add_special_tokens=False), labels)

        dialog_tokens = [dialog_tokens]
        labels_tokens = [labels]
    else:
        prompt_tokens = [tokenizer.encode(f"{tokenizer.bos_token}{B_INST} {(prompt['content']).strip()} {E_INST}",
                                          add_special_tokens=False) for prompt in dialog[::2]]
        answer_tokens = [tokenizer.encode(f"{answer['content'].strip()} {tokenizer.eos_token}",
                                          add_special_tokens=False) for answer in dialog[1::2]]
        dialog_tokens = list(itertools.chain.from_iterable(zip(prompt_tokens, answer_tokens)))
        # Add labels, convert prompt token to -100 in order to ignore in loss function
        labels_tokens = [len(c) * [-100, ] if i % 2 == 0 else c for i, c in enumerate(dialog_tokens)]

    combined_tokens = {
        "input_ids": list(itertools.chain(*(t for t in dialog_tokens))),
        "labels": list(itertools.chain(*(t for t in labels_tokens))),
    }
    return dict(combined_tokens, attention_mask=[1] * len(combined_tokens["input_ids"]))


def get_custom_dataset(dataset_config, tokenizer, split):
    with open(dataset_config.data_path) as f:
        dialogs = json.load(f)[split]
    return [tokenize_dialog(dialog, tokenizer) for dialog in dialogs]
