"""Tiny Llama models and tokenizers built locally (no hub access), for the demo and the tests.

The tokenizer is a byte-level BPE trained on a small built-in corpus, wrapped as a
``PreTrainedTokenizerFast`` (which loads in transformers 4.x and 5.x). Single letters and digits
after a space are single tokens, so character-level tasks such as "reverse: a b c" are learnable.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:\n### Input:\n### Response:",
    "Correct this to standard English: she go to school every days\n---\nCorrected: She goes to school every day.",
    "Summarize this dialog:\nAmanda: I baked cookies. Do you want some?\nJerry: Sure!\n---\nSummary:\n",
    "reverse: sort: count: add: copy: the quick brown fox jumps over the lazy dog",
    "Hello, how are you today? I am fine, thank you. What a lovely day it is.",
]


def _corpus() -> Iterable[str]:
    letters = string.ascii_lowercase + string.digits
    for _ in range(4):
        yield from _CORPUS
    yield " ".join(letters)
    yield " ".join(string.ascii_uppercase)
    yield string.punctuation


def build_tokenizer(vocab_size: int = 512, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <s>, </s>, <pad>, <unk>; BOS is prepended by ``encode``."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   padding_side="right", **SPECIAL_TOKENS)


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64,
                      num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                      intermediate_size: Optional[int] = None, max_positions: int = 512,
                      tie_word_embeddings: bool = False) -> LlamaConfig:
    """``tie_word_embeddings``: the head shares the embedding matrix and the saved files hold no
    ``lm_head.weight`` (as Llama 3.2 1B/3B)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=10000.0,
    )


def build_tiny_llama(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **config_kwargs) -> Path:
    """Write a random-initialised tiny Llama + tokenizer as a Hugging Face directory at ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_llama_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- Llama 3.2 Vision (Mllama) ---------------------------------------------------------------

IMAGE_TOKEN = "<|image|>"
# Llama 3's chat markers, so the tiny processor's chat template has the real one's shape.
CHAT_TOKENS = (IMAGE_TOKEN, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Llama 3.2 Vision's template, reduced to what a tiny model needs: BOS, a header per turn, the
# image token where a message has an image, the text, then <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tiny_processor(image_size: int = 28, max_image_tiles: int = 2):
    """An ``MllamaProcessor``: the tiny BPE tokenizer plus Llama 3 chat markers, a chat template,
    and a PIL image processor cutting images into ``max_image_tiles`` tiles of ``image_size``²."""
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    image_processor = MllamaImageProcessorPil(size={"height": image_size, "width": image_size},
                                              max_image_tiles=max_image_tiles)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def tiny_mllama_config(tokenizer, *, hidden_size: int = 32, text_layers: int = 3,
                       cross_attention_layers: tuple[int, ...] = (1,), vision_hidden: int = 32,
                       vision_layers: int = 2, image_size: int = 28, max_num_tiles: int = 2,
                       tie_word_embeddings: bool = False):
    """A Llama 3.2 Vision config a few hundred kB in size: a 2-layer vision encoder (+1 global
    layer) over 14-pixel patches, and a text decoder with cross-attention at ``cross_attention_layers``."""
    from transformers import MllamaConfig

    return MllamaConfig(
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                           num_hidden_layers=vision_layers, num_global_layers=1, attention_heads=2,
                           image_size=image_size, patch_size=14, max_num_tiles=max_num_tiles,
                           vision_output_dim=vision_hidden * 2, intermediate_layers_indices=[0],
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]][: max(1, max_num_tiles + 1)]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                         cross_attention_layers=list(cross_attention_layers), max_position_embeddings=512,
                         rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=tie_word_embeddings),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_mllama(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                      **config_kwargs) -> Path:
    """Write a random-initialised tiny Llama 3.2 Vision model and its processor (tokenizer, image
    processor, chat template) as a Hugging Face directory at ``path``."""
    import warnings

    from transformers import MllamaForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_processor(image_size=config_kwargs.get("image_size", 28),
                                     max_image_tiles=config_kwargs.get("max_num_tiles", 2))
    config = tiny_mllama_config(processor.tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MllamaForConditionalGeneration(config).to(dtype)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
