"""``shardtune generate``: text models (plain completion), vision models and adapters on them
(``--image``: a chat turn through the processor), and the bad inputs, each a clear error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

from shardtune.config.errors import ShardtuneError
from shardtune.commands.generate import main
from shardtune.infer.generate import chat_stop_ids, vision_inputs
from shardtune.infer.loading import load_for_inference

QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    """A tiny Mllama whose cross-attention gates are open (a fresh one's are zero, so its answers
    would not depend on the image)."""
    from transformers import MllamaForConditionalGeneration

    from shardtune.demo.tiny import build_tiny_mllama

    path = build_tiny_mllama(tmp_path_factory.mktemp("tiny-mllama"), seed=0)
    model = MllamaForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate" in name:
                param.fill_(1.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 60, 230)}.items():
        img = Image.new("RGB", (40, 30), (128, 128, 128))
        img.paste(Image.new("RGB", (16, 16), rgb), (8, 6))
        paths[name] = root / f"{name}.png"
        img.save(paths[name])
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    paths["broken"] = root / "broken.png"
    return paths


@pytest.fixture(scope="module")
def adapter_dir(vision_dir, tmp_path_factory):
    """A LoRA adapter saved by peft on the tiny Mllama, with non-zero weights (peft's default
    init is a no-op adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(0)
    base = MllamaForConditionalGeneration.from_pretrained(vision_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(path)
    return path


def run(argv: list[str], capsys) -> str:
    main(argv)
    return capsys.readouterr().out.removesuffix("\n")


def logits(model, processor, image_path, prompt: str = QUESTION) -> torch.Tensor:
    with Image.open(image_path) as img:
        batch = vision_inputs(processor, prompt, img.convert("RGB"))
    with torch.no_grad():
        return model(**batch).logits


# --- vision models ----------------------------------------------------------------------------

def test_image_prompt_is_a_user_chat_turn_answered_greedily(vision_dir, images, capsys):
    """What ``generate --image`` prints is what plain transformers answers to the chat template's
    user turn (image first, then the prompt), cut at the end of the turn; and it is repeatable."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    argv = [str(vision_dir), "--image", str(images["red"]), "--prompt", QUESTION, "--max_new_tokens", "8",
            "--device", "cpu"]
    first, second = run(argv, capsys), run(argv, capsys)
    assert first == second

    processor = AutoProcessor.from_pretrained(vision_dir)
    model = MllamaForConditionalGeneration.from_pretrained(vision_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith(processor.tokenizer.bos_token) and text.count(processor.tokenizer.bos_token) == 1
    batch = processor(images=[Image.open(images["red"]).convert("RGB")], text=text, add_special_tokens=False,
                      return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=chat_stop_ids(model, processor.tokenizer),
                         pad_token_id=processor.tokenizer.pad_token_id)
    assert first == processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_answer_depends_on_the_image(vision_dir, images):
    model, processor = load_for_inference(str(vision_dir))
    red, blue = logits(model, processor, images["red"]), logits(model, processor, images["blue"])
    assert red.shape == blue.shape
    assert (red - blue).abs().max() > 1e-4


def test_a_bf16_vision_model_gets_its_pixels_in_bf16(images, tmp_path, capsys):
    """The processor gives fp32 pixel values; a bf16 model's vision tower would refuse them."""
    from shardtune.demo.tiny import build_tiny_mllama

    path = build_tiny_mllama(tmp_path / "bf16", dtype=torch.bfloat16)
    model, _ = load_for_inference(str(path))
    assert model.dtype == torch.bfloat16
    argv = [str(path), "--image", str(images["red"]), "--prompt", QUESTION, "--max_new_tokens", "3", "--device", "cpu"]
    assert run(argv, capsys) == run(argv, capsys)


def test_a_vision_model_without_image_answers_from_the_text(vision_dir, capsys):
    """Allowed: Mllama runs text-only (its cross-attention layers are skipped)."""
    argv = [str(vision_dir), "--prompt", "Hello", "--max_new_tokens", "6", "--device", "cpu"]
    assert run(argv, capsys) == run(argv, capsys)


def test_lora_adapter_on_a_vision_base(vision_dir, adapter_dir, images, capsys):
    assert not (adapter_dir / "processor_config.json").exists()  # peft saves no processor
    argv = [str(adapter_dir), "--image", str(images["blue"]), "--prompt", QUESTION, "--max_new_tokens", "8",
            "--device", "cpu"]
    assert run(argv, capsys) == run(argv, capsys)

    adapted, processor = load_for_inference(str(adapter_dir))
    assert type(adapted.get_base_model()).__name__ == "MllamaForConditionalGeneration"  # from the family table
    assert processor.tokenizer.name_or_path == str(vision_dir)  # the base's processor
    base, _ = load_for_inference(str(vision_dir))
    assert (logits(adapted, processor, images["blue"]) - logits(base, processor, images["blue"])).abs().max() > 1e-4


def test_an_adapter_with_its_own_processor_uses_it(vision_dir, adapter_dir, tmp_path):
    from transformers import AutoProcessor

    own = shutil.copytree(adapter_dir, tmp_path / "adapter-with-processor")
    AutoProcessor.from_pretrained(vision_dir).save_pretrained(own)
    _, processor = load_for_inference(str(own))
    assert processor.tokenizer.name_or_path == str(own)


# --- text models (unchanged: plain completion) ------------------------------------------------

def test_text_model_completes_the_plain_prompt(tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    got = run([str(tiny_model_dir), "--prompt", "Hello, how are", "--max_new_tokens", "5", "--device", "cpu"], capsys)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tokenizer("Hello, how are", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert got == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_text_adapter_with_its_tokenizer_beside_it(tiny_model_dir, tmp_path, capsys):
    """As the recipe's PEFT output: adapter + tokenizer files, no config.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"])) \
        .save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    _, tokenizer = load_for_inference(str(adapter))
    assert tokenizer.name_or_path == str(adapter)
    argv = [str(adapter), "--prompt", "Hello", "--max_new_tokens", "3", "--device", "cpu"]
    assert run(argv, capsys) == run(argv, capsys)


# --- bad inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("text_model", r"--image needs a vision model .* is a text model \(llama family\)\. Drop --image"),
    ("missing", r"--image '.*no-such\.png' does not exist"),
    ("broken", r"--image '.*broken\.png' could not be read as an image"),
])
def test_bad_image_inputs_are_clear_errors(case, message, vision_dir, tiny_model_dir, images):
    model = tiny_model_dir if case == "text_model" else vision_dir
    image = {"text_model": images["red"], "missing": images["red"].parent / "no-such.png",
             "broken": images["broken"]}[case]
    with pytest.raises(ShardtuneError, match=message):
        main([str(model), "--image", str(image), "--prompt", "hi", "--device", "cpu"])


def test_image_for_a_text_model_through_the_cli_is_one_paragraph(tiny_model_dir, images, shardtune_cli):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = shardtune_cli(["generate", str(tiny_model_dir), "--prompt", "hi", "--image", str(images["red"]),
                          "--device", "cpu"], timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs a vision model" in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"]])
def test_bad_decoding_options_are_refused_before_torch_is_imported(tmp_path, command):
    """Options, prompts and --output are checked first: such a refusal takes 0.1 s, not 2-5 s."""
    name, *rest = command
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "shardtune", name, str(tmp_path), *rest,
                           "--top_p", "2", "--temperature", "0.5"], capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and errors == ["error: --top_p must be above 0 and at most 1, got 2.0."], proc.stderr[-3000:]
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert f"shardtune.commands.{name}" in imported and "torch" not in imported
