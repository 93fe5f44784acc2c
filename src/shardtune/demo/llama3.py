"""The real Llama 3 tokenizer, built offline from Meta's BPE file in the ``llama-models`` package.

``llama_models/llama3/tokenizer.model`` holds the 128,000 byte-level BPE ranks in tiktoken's
format; transformers' ``TikTokenConverter`` turns them into a fast tokenizer with Meta's split
pattern. The 256 special tokens follow from id 128000 with the names Hugging Face's Llama 3.1 /
3.2 tokenizers give them, and BOS is added by a ``TemplateProcessing`` post-processor, as in their
``tokenizer.json``: "Hello world!" encodes to 128000, 9906, 1917, 0. Used by the tests and
benchmarks that need real ids (chat masks by <|eot_id|> 128009, packing with real lengths).
Needs ``llama-models`` and ``tiktoken`` (the ``dev`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

BASE_VOCAB = 128_000
VOCAB = 128_256  # base ranks + 256 special tokens: a Llama 3 text model's vocab_size
BOS = "<|begin_of_text|>"
NAMED_SPECIALS = (BOS, "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
INSTRUCT_STOP_IDS = (128001, 128008, 128009)  # Llama 3.2 Instruct's generation_config eos_token_id
# Meta's pat_str (llama_models/llama3/tokenizer.py)
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def special_tokens() -> list[str]:
    """Ids 128000..128255 of Hugging Face's Llama 3.1/3.2 tokenizers, in order."""
    named = list(NAMED_SPECIALS)
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]


def bpe_file() -> Path:
    try:
        import llama_models
        import tiktoken  # noqa: F401  (TikTokenConverter reads the file with it)
    except ImportError as e:
        from ..config.errors import ShardtuneError

        raise ShardtuneError(f"The real Llama 3 tokenizer is built from Meta's BPE file in the llama-models "
                             f"package and needs tiktoken ({e.name} is not installed): pip install "
                             f"'shardtune[dev]' or pip install llama-models tiktoken.") from None
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def build_llama3_tokenizer(chat_template: Optional[str] = None, *, eos_token: str = "<|eot_id|>",
                           pad_token: Optional[str] = None):
    """The Llama 3 tokenizer as a ``PreTrainedTokenizerFast``; the defaults are the Instruct
    models' (EOS <|eot_id|>, no pad token). A base model's EOS is <|end_of_text|>."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(bpe_file()), pattern=PATTERN,
                            extra_special_tokens=special_tokens()).converted()
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))])])
    specials = {"bos_token": BOS, "eos_token": eos_token}
    if pad_token:
        specials["pad_token"] = pad_token
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=131072, chat_template=chat_template,
                                   clean_up_tokenization_spaces=True, **specials)
