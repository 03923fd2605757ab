"""Chat messages as the engine accepts them: checked, with list content flattened to text."""

from __future__ import annotations

from typing import Any

VALID_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _flatten_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{j}].text must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and return copies whose content is a plain string.

    Raises ValueError naming the offending message for a non-list, an empty list, a message
    that is not a dict, an unknown role, or content that is not text.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in VALID_ROLES:
            raise ValueError(f"{where}.role must be one of {sorted(VALID_ROLES)}, got {role!r}")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""
        out.append({**message, "content": _flatten_content(content, where)})
    return out
