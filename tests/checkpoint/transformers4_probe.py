"""Load model folders with transformers 4.x, as a user still on it would, and report what it read.

    PYTHONPATH=<transformers 4.57 folder> python transformers4_probe.py REQUEST.json RESULT.json

REQUEST: {"ids": [[...]], "text": "...", "folders": {name: path}}. RESULT: per name, the
transformers version, the config's rope_theta and rope_scaling, fp32 logits of ``ids``, the
tokenizer's class and its ids for ``text`` (or the error that stopped it). Imports nothing of
shardtune: this is the consumer's side.
"""

import json
import sys
import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def probe(folder: str, ids: torch.Tensor, text: str) -> dict:
    out: dict = {"transformers": transformers.__version__}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        out["rope_theta"] = getattr(model.config, "rope_theta", None)
        out["rope_scaling"] = getattr(model.config, "rope_scaling", None)
        with torch.no_grad():
            out["logits"] = model(input_ids=ids).logits.float().tolist()
    except Exception as exc:  # noqa: BLE001 - reported to the test, which names the folder
        out["model_error"] = f"{type(exc).__name__}: {exc}"[:500]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        out["tokenizer_class"] = type(tokenizer).__name__
        out["text_ids"] = tokenizer(text)["input_ids"]
    except Exception as exc:  # noqa: BLE001
        out["tokenizer_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return out


def main() -> None:
    request = json.loads(open(sys.argv[1]).read())
    ids = torch.tensor(request["ids"])
    warnings.simplefilter("ignore")
    results = {name: probe(path, ids, request["text"]) for name, path in request["folders"].items()}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
