"""shardtune custom dataset of the peer benchmark: pre-tokenised documents, labels = inputs.

    --dataset custom_dataset --custom_dataset.file benchmarks/peer_runners/shardtune_data.py
    --custom_dataset.data_path DOCS.json      (written by benchmarks.peers: {"docs": [[ids...], ...]})
"""

from __future__ import annotations

import json
from pathlib import Path


def get_custom_dataset(dataset_config, tokenizer, split: str) -> list[dict]:
    docs = json.loads(Path(dataset_config.data_path).read_text())["docs"]
    # The recipe's loss shifts by one: labels[0] is never a target, as in every peer.
    return [{"input_ids": doc, "labels": list(doc)} for doc in docs]
