"""How ``shardtune generate`` and ``shardtune chat`` choose tokens (:class:`Sampling`), with its
checks. No torch here: the commands refuse bad decoding options before importing it (0.1 s, not 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.errors import ShardtuneError


@dataclass
class Sampling:
    """How tokens are chosen: greedy when ``temperature`` is 0 (the default)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Options that would be ignored or fail later are refused here."""
        if self.max_new_tokens < 1:
            raise ShardtuneError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ShardtuneError(f"--temperature must be 0 (greedy decoding) or positive (sampling), got "
                                 f"{self.temperature}.")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ShardtuneError(f"--top_p must be above 0 and at most 1, got {self.top_p}.")
        if self.top_k < 0:
            raise ShardtuneError(f"--top_k must be 0 (off) or positive, got {self.top_k}.")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ShardtuneError(f"--repetition_penalty must be positive (1.0: off), got {self.repetition_penalty}.")
        if self.temperature == 0 and (self.top_p < 1 or self.top_k > 0):
            raise ShardtuneError("--top_p and --top_k only apply when sampling; add --temperature (e.g. 0.7) "
                                 "or drop them.")

    def generate_kwargs(self) -> dict:
        sample = self.temperature > 0
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": sample,
                  "repetition_penalty": self.repetition_penalty}
        if sample:  # transformers warns about sampling options under greedy decoding
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs
