"""Shared fixtures: tiny models and tokenizers built locally, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep each test process to the machine's two cores and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests run only where a CUDA GPU is visible (scripts/device_check.sh)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/device_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-initialised 2-layer Llama (~160k params) + BPE tokenizer as an HF directory."""
    from shardtune.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """The same tiny Llama with tied input/output embeddings (no lm_head.weight in its files)."""
    from shardtune.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-tied-llama"), seed=0, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_vision_model_dir(tmp_path_factory) -> Path:
    """A random-initialised tiny Llama 3.2 Vision (Mllama, ~110k params) + its processor."""
    from shardtune.demo.tiny import build_tiny_mllama

    return build_tiny_mllama(tmp_path_factory.mktemp("tiny-vision"), seed=0)


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def write_colour_rows(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` the_cauldron-style rows (one PNG each, a block of colour on grey; the answer is the
    colour) as ``folder/data.jsonl`` with image paths relative to it."""
    import json
    import random

    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        image = Image.new("RGB", (rng.randint(24, 40), rng.randint(24, 40)), (128, 128, 128))
        image.paste(COLOURS[name], (4, 4, image.width - 4, image.height - 4))
        image.save(folder / "images" / f"{i}.png")
        rows.append({"images": [f"images/{i}.png"],
                     "texts": [{"user": "What colour is the block?", "assistant": name}]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def colour_rows(tmp_path_factory) -> Path:
    """40 image + question + answer rows for ``--dataset ocrvqa_dataset`` (a JSONL file)."""
    return write_colour_rows(tmp_path_factory.mktemp("colour-rows"), 40)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


FSDP_WORKER = Path(__file__).parent / "parallel" / "fsdp_worker.py"


@pytest.fixture(scope="session")
def run_fsdp_cases():
    """Run named recipe cases on 2 real gloo ranks in one torchrun launch (see fsdp_worker.py)."""
    import json
    import subprocess
    import sys

    def run(root: Path, cases: dict, timeout_s: int = 600) -> dict:
        (root / "cases.json").write_text(json.dumps(cases))
        out = root / "results.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(FSDP_WORKER), str(root / "cases.json"), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as exc:  # the worker's own watchdog should fire first
            def tail(b):
                return (b.decode(errors="replace") if isinstance(b, bytes) else (b or ""))[-6000:]

            pytest.fail(f"2-rank run timed out after {timeout_s} s\n{tail(exc.stdout)}\n{tail(exc.stderr)}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
        return json.loads(out.read_text())

    return run


@pytest.fixture(scope="session")
def ranks(tiny_model_dir, tmp_path_factory) -> Path:
    """shardtune full + LoRA checkpoints and llama-recipes FSDP1 checkpoints, written by 2 gloo ranks
    (tests/convert/make_checkpoints.py): what conversion and inference read."""
    import json
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("ranks")
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": f"Spell {i}.", "output": " ".join(str(i))} for i in range(24)]))
    script = Path(__file__).parent / "convert" / "make_checkpoints.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(root), str(tiny_model_dir), str(data)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and (root / "DONE").is_file(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


def pytest_sessionfinish(session, exitstatus):
    """Where SHARDTUNE_PYTEST_FINISHED names a file, write it when the run reaches its end.

    ``.ci/run`` checks for it: a test that ends the pytest process itself (``os._exit(0)``) leaves
    exit code 0 and no summary, which once made CI pass with a quarter of the suite not run.
    """
    marker = os.environ.get("SHARDTUNE_PYTEST_FINISHED")
    if marker:
        Path(marker).write_text(f"{session.testscollected} collected, exit status {int(exitstatus)}\n")


# --- The real Llama 3 tokenizer and chat templates (issue 21) ---------------------------------
# Built once per session from Meta's BPE file in the `llama-models` package
# (shardtune.demo.llama3). The chat templates are Meta's public Jinja text, kept in
# tests/data/chat_templates/ (see the README there for where they come from).

CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with the real Llama 3 tokenizer and Llama 3.2 Instruct's chat template."""
    from shardtune.demo.llama3 import build_llama3_tokenizer

    path = tmp_path_factory.mktemp("llama3-tokenizer")
    template = (CHAT_TEMPLATES / "llama-3.2-instruct.jinja").read_text(encoding="utf-8")
    build_llama3_tokenizer(template).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def llama3_chat_model_dir(llama3_tokenizer_dir, tmp_path_factory) -> Path:
    """A random tiny Llama (hidden 16, 2 layers) with the real vocabulary (128,256 ids) and the real
    tokenizer + Instruct template: the paths that need real ids (chat masks by <|eot_id|> 128009)."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    from shardtune.demo.llama3 import INSTRUCT_STOP_IDS, VOCAB
    from shardtune.demo.tiny import tiny_llama_config

    path = tmp_path_factory.mktemp("llama3-chat-model")
    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    config = tiny_llama_config(tokenizer, hidden_size=16, intermediate_size=32)
    config.vocab_size, config.pad_token_id = VOCAB, None  # Llama 3.2 Instruct has no pad token
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    GenerationConfig(bos_token_id=128000, eos_token_id=list(INSTRUCT_STOP_IDS)).save_pretrained(path)
    for f in llama3_tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def real_vocab_vision_model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama 3.2 Vision (Mllama) whose ``MllamaProcessor`` is the real Llama 3
    tokenizer + <|image|> at id 128256 (as Llama-3.2-11B-Vision-Instruct's) + a tiny image
    processor + the Vision Instruct chat template; text vocab_size 128,256 as the real model's."""
    import warnings

    from transformers import GenerationConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from shardtune.demo.llama3 import INSTRUCT_STOP_IDS, VOCAB, build_llama3_tokenizer
    from shardtune.demo.tiny import IMAGE_TOKEN, tiny_mllama_config

    path = tmp_path_factory.mktemp("real-vocab-vision")
    template = (CHAT_TEMPLATES / "llama-3.2-vision-instruct.jinja").read_text(encoding="utf-8")
    tokenizer = build_llama3_tokenizer(template, pad_token="<|finetune_right_pad_id|>")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == VOCAB
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": 28, "width": 28},
                                                                        max_image_tiles=2),
                                tokenizer=tokenizer, chat_template=template)
    config = tiny_mllama_config(tokenizer, hidden_size=16)
    config.text_config.vocab_size = VOCAB  # <|image|> lives in the embedding's 8 extra rows
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MllamaForConditionalGeneration(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    GenerationConfig(bos_token_id=128000, eos_token_id=list(INSTRUCT_STOP_IDS),
                      pad_token_id=tokenizer.pad_token_id).save_pretrained(path)
    return path
