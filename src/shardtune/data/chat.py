"""Conversation rows -> chat messages, for ``--dataset chat_dataset``.

Two row styles are read and normalised into one list of messages, so the same conversation in
either style gives the same sample:

* OpenAI: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}``;
  ``content`` is a string or a list of parts (``{"type": "text", "text": ...}``, ``{"type":
  "image"}``); an assistant message may carry ``tool_calls`` (then its content may be empty); a
  tool message may carry ``tool_call_id`` / ``name``.
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt"|"tool", "value": ...}, ...]}``
  (a ``gpt`` turn may carry ``tool_calls`` as well).

Either row may hold ``tools`` (a list of JSON schemas, or that list as a JSON string) for the
template, and ``images`` (a vision model's image files, one per ``{"type": "image"}`` part, in
order). A message holds only the keys the template should see: templates test for a key's
presence (Llama 3.2's: ``'tool_calls' in message``). Text-only part lists become one string (the
texts joined), since text templates such as Llama 3.2's read ``content`` as a string; a message
with an image keeps its parts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from .rows import BadRow

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "tool": "tool"}


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)  # the row's "images" values, as given
    tools: Optional[list[dict]] = None

    def assistant_turns(self) -> list[int]:
        return [k for k, m in enumerate(self.messages) if m["role"] == "assistant"]


def conversation(row: Any) -> Conversation:
    """A row in either style -> its :class:`Conversation`; a malformed row raises BadRow."""
    if not isinstance(row, Mapping):
        raise BadRow(f"is a {type(row).__name__}, expected an object with 'messages' or 'conversations'")
    has_openai, has_sharegpt = row.get("messages") is not None, row.get("conversations") is not None
    if has_openai == has_sharegpt:
        what = "both 'messages' and 'conversations'" if has_openai else f"neither (fields: {sorted(map(str, row))})"
        raise BadRow(f"must hold one of 'messages' (OpenAI style) or 'conversations' (ShareGPT style), "
                     f"but has {what}")
    key = "messages" if has_openai else "conversations"
    turns = row[key]
    if not isinstance(turns, (list, tuple)) or not turns:
        raise BadRow(f"field {key!r} is {'empty' if isinstance(turns, (list, tuple)) else 'a ' + type(turns).__name__}"
                     ", expected a list of messages")
    read = _openai_message if has_openai else _sharegpt_message
    messages = [read(turn, k) for k, turn in enumerate(turns)]
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("has no assistant turn, so nothing in it would be trained")
    images = row.get("images")
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    n_parts = sum(isinstance(m["content"], list) and sum(p["type"] == "image" for p in m["content"])
                  for m in messages)
    if n_parts != len(images):
        raise BadRow(f"has {len(images)} image(s) in 'images' but {n_parts} {{\"type\": \"image\"}} part(s) in "
                     "its messages; each image needs one part where it goes in the conversation")
    return Conversation(messages, list(images), _tools(row.get("tools")))


def _openai_message(turn: Any, k: int) -> dict[str, Any]:
    if not isinstance(turn, Mapping):
        raise BadRow(f"has message {k} of type {type(turn).__name__}, expected {{\"role\": ..., \"content\": ...}}")
    role = turn.get("role")
    if role not in ROLES:
        raise BadRow(f"has message {k} with {'no role' if role is None else f'the unknown role {role!r}'} "
                     f"(roles: {', '.join(ROLES)})")
    return _message(role, turn.get("content"), turn, k)


def _sharegpt_message(turn: Any, k: int) -> dict[str, Any]:
    if not isinstance(turn, Mapping):
        raise BadRow(f"has turn {k} of type {type(turn).__name__}, expected {{\"from\": ..., \"value\": ...}}")
    who = turn.get("from")
    if who not in SHAREGPT_ROLES:
        raise BadRow(f"has turn {k} with {'no from' if who is None else f'the unknown from {who!r}'} "
                     f"(ShareGPT turns are from: {', '.join(SHAREGPT_ROLES)})")
    return _message(SHAREGPT_ROLES[who], turn.get("value"), turn, k)


def _message(role: str, content: Any, turn: Mapping, k: int) -> dict[str, Any]:
    where = f"message {k} ({role})"
    tool_calls = turn.get("tool_calls")
    if tool_calls is not None and role != "assistant":
        raise BadRow(f"has tool_calls on {where}; only assistant messages call tools")
    message: dict[str, Any] = {"role": role}
    if tool_calls:
        message["content"] = "" if content is None else _content(content, where, allow_empty=True)
        message["tool_calls"] = [_tool_call(c, where) for c in _as_list(tool_calls, "tool_calls", where)]
    else:
        message["content"] = _content(content, where, allow_empty=False)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(turn.get(key), str):
                message[key] = turn[key]
    return message


def _content(content: Any, where: str, *, allow_empty: bool) -> Any:
    if isinstance(content, str):
        if not allow_empty and not content.strip():
            raise BadRow(f"has {where} with empty content")
        return content
    if not isinstance(content, (list, tuple)):
        what = "no content" if content is None else f"content of type {type(content).__name__}"
        raise BadRow(f"has {where} with {what}; expected a string or a list of parts "
                     "({\"type\": \"text\", \"text\": ...} or {\"type\": \"image\"})")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise BadRow(f"has {where} whose part {j} is not {{\"type\": \"text\", \"text\": \"...\"}} or "
                         f"{{\"type\": \"image\"}} (got {part!r:.80})")
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    if not allow_empty and not text.strip() and not any(p["type"] == "image" for p in parts):
        raise BadRow(f"has {where} with empty content")
    if all(p["type"] == "text" for p in parts):
        return text  # text templates read content as a string
    return parts


def _as_list(value: Any, name: str, where: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise BadRow(f"has {where} whose {name} is a {type(value).__name__}, expected a list")


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """OpenAI's ``{"type": "function", "function": {"name", "arguments"}}`` (or the bare
    ``{"name", "arguments"}``), arguments as an object: OpenAI sends them as a JSON string, which a
    template's ``tojson`` would quote a second time."""
    if not isinstance(call, Mapping):
        raise BadRow(f"has {where} with a tool call of type {type(call).__name__}, expected an object")
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise BadRow(f"has {where} with a tool call without a function name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise BadRow(f"has {where} calling {name!r} with arguments that are not JSON ({e.msg})") from None
    if not isinstance(arguments, Mapping):
        raise BadRow(f"has {where} calling {name!r} with arguments of type {type(arguments).__name__}, "
                     "expected an object")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": dict(arguments)}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tools(tools: Any) -> Optional[list[dict]]:
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):  # LLaMA-Factory's ShareGPT files store them as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise BadRow(f"has 'tools' that is a string but not JSON ({e.msg})") from None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
        raise BadRow("has 'tools' that is not a list of JSON schema objects")
    return [dict(t) for t in tools]
