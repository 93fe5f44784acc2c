"""Prompts for ``shardtune generate``: ``--prompt`` (repeatable), ``--prompt_file`` or stdin.

A prompt file is plain text (one prompt a line; blank lines skipped) or JSON Lines (``.jsonl``,
or a first line that is a JSON object), each row holding either ``prompt`` (a string) or
``messages`` (a chat: a list of ``{"role", "content"}``), and optionally ``image`` (a path, for
a vision model; relative to the file). A bad row is an error naming the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..config.errors import ShardtuneError

ROLES = ("system", "user", "assistant")


@dataclass
class Prompt:
    """One request: plain text, or a chat (``messages``) for the chat template."""

    text: Optional[str] = None
    messages: Optional[list[dict]] = None
    image: Optional[str] = None

    @property
    def shown(self) -> str:
        """The prompt as written to ``--output``: the text, or the last user message."""
        if self.text is not None:
            return self.text
        return next((m["content"] for m in reversed(self.messages or []) if m["role"] == "user"), "")


def check_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ShardtuneError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects.")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ShardtuneError(f"{where}: message {i} must be an object with \"role\" (one of {', '.join(ROLES)}) "
                                 f"and a string \"content\"; got {json.dumps(m)[:120]}.")
    return messages


def _row(line: str, where: str, folder: Path) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ShardtuneError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}). A JSONL prompt file "
                             "holds one JSON object a line.") from None
    if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise ShardtuneError(f"{where}: each row must be an object with either \"prompt\" or \"messages\".")
    image = row.get("image")
    if image is not None and not isinstance(image, str):
        raise ShardtuneError(f"{where}: \"image\" must be a path (a string).")
    image = str(folder / image) if image is not None and not Path(image).is_absolute() else image
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise ShardtuneError(f"{where}: \"prompt\" must be a non-empty string.")
        return Prompt(text=row["prompt"], image=image)
    return Prompt(messages=check_messages(row["messages"], where), image=image)


def parse_lines(lines: Iterable[str], source: str, folder: Path = Path("."), jsonl: Optional[bool] = None) -> list[Prompt]:
    """Prompts from the lines of a file or stdin (``source`` names it in errors)."""
    prompts = []
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\n").rstrip("\r")
        if not line.strip():
            continue
        if jsonl is None:  # decided by the first non-blank line
            jsonl = line.lstrip().startswith("{")
        where = f"{source}, line {number}"
        prompts.append(_row(line, where, folder) if jsonl else Prompt(text=line))
    return prompts


def read_prompt_file(path: str) -> list[Prompt]:
    file = Path(path)
    if not file.is_file():
        raise ShardtuneError(f"--prompt_file {path!r} does not exist (or is not a file). Pass a text file with one "
                             "prompt a line, or a JSONL file with \"prompt\" or \"messages\" in each row.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ShardtuneError(f"--prompt_file {path!r} is not UTF-8 text (byte {exc.start}). Save it as UTF-8.") from None
    prompts = parse_lines(text.splitlines(), f"--prompt_file {path}", file.parent,
                          jsonl=True if file.suffix == ".jsonl" else None)
    if not prompts:
        raise ShardtuneError(f"--prompt_file {path!r} holds no prompt (it is empty or blank).")
    return prompts
