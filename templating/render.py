"""Render a conversation to text with a `Template` (pure: same input, same string).

Rules (normative text in spec/templates.md):
1. Turns are normalised: the speaker is `from` (llava, ShareGPT) or `role` (OpenAI chat), the text
   `value`, `content` or `text`, in any pairing (`{"role", "value"}` and `{"from", "content"}` are
   common in the wild); content may be a string or a list of `{"type": "text"|"image"}` parts (an
   image part becomes `<image>`, plus `\\n` when more parts follow). A turn without a text field (or
   with `null`) is an error naming the turn, never an empty turn.
2. Each content has `replace_tokens` applied in order, then (not the system text) is stripped
   of surrounding whitespace if `strip_content`.
3. The system text is the conversation's leading system turn, else `default_system` when non-empty;
   it is rendered with `format_system` first (or, with `system_placement="first_user"`, prepended to
   the first user turn's content).
4. Every other turn is rendered with its role's format (`{{content}}` replaced once); the separator
   is NOT inserted (each format carries its own newlines); a role whose format is "" is dropped.
5. The result is `prefix` + the rendered turns, then `replace_rendered` is applied to the whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from signround.templating.template import PLACEHOLDER, Template

IMAGE_TOKEN = "<image>"

ROLE_ALIASES: Mapping[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "developer": "system",
    "function": "function",
    "function_call": "function",
    "tool_call": "function",
    "observation": "observation",
    "tool": "observation",
    "ipython": "observation",
}


#: where a turn names its speaker, and where its text is (first present wins)
ROLE_KEYS = ("from", "role")
TEXT_KEYS = ("value", "content", "text")


@attrs.frozen
class Turn:
    """One normalised turn: role in {system, user, assistant, function, observation}."""

    role: str
    content: str


class ConversationError(ValueError):
    """A conversation could not be read (bad role, bad content type, ...)."""


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts: list[str] = []
        items = list(content)
        for i, part in enumerate(items):
            if not isinstance(part, Mapping):
                raise ConversationError(f"{where}: content part {i} must be a mapping, got {type(part).__name__}")
            kind = part.get("type", "text" if "text" in part else None)
            if kind == "text":
                parts.append(str(part.get("text", "")))
            elif kind == "image" or "image" in part or "image_url" in part:
                parts.append(IMAGE_TOKEN + ("\n" if i + 1 < len(items) else ""))
            else:
                raise ConversationError(f"{where}: content part {i} has unknown type {kind!r}")
        return "".join(parts)
    raise ConversationError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")


def normalize(conversation: Iterable[Mapping[str, Any] | Turn]) -> tuple[Turn, ...]:
    """Turn llava-style or chat-style messages into `Turn`s with canonical role names."""
    if isinstance(conversation, (str, bytes, Mapping)):
        raise ConversationError("a conversation must be a list of turns")
    turns: list[Turn] = []
    for i, msg in enumerate(conversation):
        if isinstance(msg, Turn):
            turns.append(msg)
            continue
        if not isinstance(msg, Mapping):
            raise ConversationError(f"turn {i}: must be a mapping, got {type(msg).__name__}")
        role_key = next((k for k in ROLE_KEYS if k in msg), None)
        if role_key is None:
            raise ConversationError(f"turn {i}: needs a speaker ('from' or 'role') and a text ('value', 'content' "
                                    f"or 'text'), got keys {sorted(map(str, msg))}")
        raw_role = msg[role_key]
        role = ROLE_ALIASES.get(str(raw_role).lower())
        if role is None:
            raise ConversationError(f"turn {i}: unknown role {raw_role!r}; known: {sorted(ROLE_ALIASES)}")
        text_key = next((k for k in TEXT_KEYS if msg.get(k) is not None), None)
        if text_key is None:
            raise ConversationError(f"turn {i} ({role_key} {raw_role!r}) has no text: expected one of "
                                    f"{', '.join(TEXT_KEYS)} (got keys {sorted(map(str, msg))})")
        turns.append(Turn(role, _content_text(msg[text_key], f"turn {i}")))
    return tuple(turns)


def apply_replacements(text: str, pairs: Iterable[tuple[str, str]]) -> str:
    """Apply `(old, new)` pairs in order, each to the result of the previous one."""
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def _fill(fmt: str, content: str) -> str:
    return fmt.replace(PLACEHOLDER, content, 1)


def render(template: Template, conversation: Iterable[Mapping[str, Any] | Turn]) -> str:
    """Render `conversation` to one string following `template` (rules in the module docstring)."""
    turns = normalize(conversation)

    def prepare(text: str, strip: bool = template.strip_content) -> str:
        text = apply_replacements(text, template.replace_tokens)
        return text.strip() if strip else text

    system: str | None = None
    if turns and turns[0].role == "system":
        system, turns = turns[0].content, turns[1:]
    elif template.default_system:
        system = template.default_system

    formats = {
        "system": template.format_system,
        "user": template.format_user,
        "assistant": template.format_assistant,
        "function": template.format_function,
        "observation": template.format_observation,
    }
    out: list[str] = []
    pending_system: str | None = None
    if system is not None:
        rendered_system = _fill(template.format_system, prepare(system, strip=False))
        if template.system_placement == "first_user" and any(t.role == "user" for t in turns):
            pending_system = rendered_system
        else:
            out.append(rendered_system)
    for turn in turns:
        fmt = formats[turn.role]
        if not fmt:
            continue
        content = prepare(turn.content)
        if pending_system is not None and turn.role == "user":
            content, pending_system = pending_system + content, None
        out.append(_fill(fmt, content))
    return apply_replacements(template.prefix + "".join(out), template.replace_rendered)
