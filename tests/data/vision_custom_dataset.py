"""A llama-recipes style custom vision dataset (test fixture, used through --custom_dataset.file).

Same interface as llama-recipes' recipes/quickstart/finetuning/datasets/ocrvqa_dataset.py, but the
rows come from a local JSON-lines file (``--custom_dataset.data_path``, images as paths relative to
it) instead of the hub: ``get_custom_dataset`` returns raw rows with PIL images, and the collator
from ``get_data_collator`` runs the processor on a batch, adds the labels and returns the
processor's ``BatchFeature`` unchanged (a ``UserDict``, not a ``dict``), as the cookbook's does.
"""

import json
import random
from pathlib import Path

import torch
from PIL import Image


def get_custom_dataset(dataset_config, processor, split, split_ratio=0.9):
    path = Path(dataset_config.data_path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        row["images"] = [Image.open(path.parent / name) for name in row["images"]]
    order = list(range(len(rows)))
    random.Random(42).shuffle(order)
    n_train = int(len(rows) * split_ratio)
    chosen = order[:n_train] if split == "train" else order[n_train:]
    return [rows[i] for i in chosen]


class VisionDataCollator:
    def __init__(self, processor):
        self.processor = processor
        self.processor.tokenizer.padding_side = "right"
        tok = processor.tokenizer
        self.start, self.end, self.eot = (tok.convert_tokens_to_ids(t) for t in
                                          ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))

    def _labels(self, ids):
        """Train on what follows an assistant header, up to and including its <|eot_id|>."""
        labels, role, in_header, trained = [], [], False, False
        for t in ids:
            if t == self.start:
                in_header, role = True, []
            if in_header:
                role.append(t)
            labels.append(t if trained else -100)
            if t == self.end:
                in_header = False
                trained = self.processor.tokenizer.decode(role[1:-1]).strip() == "assistant"
            elif t == self.eot:
                trained = False
        return labels

    def __call__(self, samples):
        texts, images = [], []
        for sample in samples:
            dialog = []
            for i, turn in enumerate(sample["texts"]):
                parts = [{"type": "image"}] * (len(sample["images"]) if i == 0 else 0)
                dialog.append({"role": "user", "content": parts + [{"type": "text", "text": turn["user"]}]})
                dialog.append({"role": "assistant", "content": [{"type": "text", "text": turn["assistant"]}]})
            texts.append(self.processor.apply_chat_template(dialog, tokenize=False))  # starts with BOS
            images.append([im.convert("RGB") for im in sample["images"]])
        batch = self.processor(images=images, text=texts, padding=True, return_tensors="pt",
                               add_special_tokens=False)
        labels = [self._labels(row.tolist()) for row in batch["input_ids"]]
        batch["labels"] = torch.tensor(labels)
        batch["labels"][batch["attention_mask"] == 0] = -100
        return batch


def get_data_collator(processor):
    return VisionDataCollator(processor)
