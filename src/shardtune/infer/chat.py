"""A chat session with a model in memory: the history through the chat template, ``/reset`` and
``/exit``, the oldest turns dropped when the conversation outgrows the context (a system prompt
kept). The ``shardtune chat`` command (``commands/chat.py``) drives it.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..model.loading import text_tokenizer
from .generate import Sampling, chat_text, generate_batch
from .prompts import Prompt

HELP = "Type a message. /reset clears the conversation, /exit ends it."


def _fit(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], int]:
    """The newest turns that fit ``budget`` tokens with the system prompt; how many were dropped."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while len(turns) > 1 and len(tokenizer(chat_text(tokenizer, system + turns),
                                           add_special_tokens=False)["input_ids"]) > budget:
        turns = turns[2:] if len(turns) > 2 else turns[1:]  # a user turn and its answer
        dropped += 1
    return system + turns, dropped


class ChatSession:
    """The conversation state: history plus the model that answers."""

    def __init__(self, model, inputs, sampling: Sampling, system: Optional[str] = None, image=None):
        self.model, self.inputs, self.sampling, self.image = model, inputs, sampling, image
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = list(self.system)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        text_config = getattr(getattr(model, "config", None), "text_config", None)
        limit = limit or getattr(text_config, "max_position_embeddings", None) or 4096
        self.budget = max(1, limit - sampling.max_new_tokens)
        chat_text(text_tokenizer(inputs), [{"role": "user", "content": "hi"}])  # no template: refused now

    def reset(self) -> None:
        self.history = list(self.system)

    def ask(self, text: str, streamer=None, note: Callable[[str], None] = print) -> str:
        self.history.append({"role": "user", "content": text})
        self.history, dropped = _fit(text_tokenizer(self.inputs), self.history, self.budget)
        if dropped:
            note(f"(the conversation outgrew the model's context: the oldest {dropped} exchange(s) were dropped)")
        reply = generate_batch(self.model, self.inputs, [Prompt(messages=self.history)], self.sampling,
                               chat=True, image=self.image, streamer=streamer)[0]
        self.history.append({"role": "assistant", "content": reply})
        return reply


def run_session(session: ChatSession, read: Callable[[], str], write: Callable[[str], None],
                stream: bool = False) -> None:
    """The read-answer loop; ``read`` raises EOFError at the end of input."""
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(text_tokenizer(session.inputs), skip_prompt=True, skip_special_tokens=True)
    while True:
        try:
            line = read()
        except EOFError:
            break
        command = line.strip()
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            write("(conversation cleared)")
            continue
        if not command:
            continue
        if command.startswith("/"):
            write(f"(unknown command {command.split()[0]}; {HELP})")
            continue
        reply = session.ask(line, streamer=streamer, note=write)
        if streamer is None:
            write(reply)
