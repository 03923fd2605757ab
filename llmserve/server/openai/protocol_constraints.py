"""Request fields that shape the output: response_format, structured outputs, tools, messages
that carry tool calls, and the OpenAI fields this server refuses.

OpenAI names (`response_format`, `tools`, `tool_choice`, `parallel_tool_calls`), plus vLLM's
extra body for constrained decoding: `structured_outputs: {json | regex | choice | grammar |
json_object}` and the older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI's rule for function names.
FUNCTION_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Closed(BaseModel):
    """Objects whose every key matters: an unknown key is refused, not ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")


class JSONSchemaFormat(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    description: str | None = None
    # `schema` is a BaseModel attribute; the JSON key is aliased.
    json_schema: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatText(_Strict):
    type: Literal["text"]


class ResponseFormatJSONObject(_Strict):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
    Field(discriminator="type"),
]


class StructuredOutputs(_Closed):
    """vLLM's `structured_outputs` extra body (exactly one key)."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    name: str
    arguments: str | dict

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str | dict) -> dict:
        # Chat templates read the arguments as a mapping (`| tojson`, `.items()`).
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise ValueError("function.arguments must be a JSON object") from None
        if not isinstance(parsed, dict):
            raise ValueError("function.arguments must be a JSON object")
        return parsed


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def as_template_call(self) -> dict:
        return {"id": self.id, "type": self.type,
                "function": {"name": self.function.name, "arguments": self.function.arguments}}


# Fields of OpenAI's chat request that this server does not implement: set to anything but
# their default, they get a 400 naming them (never silently ignored).
UNSUPPORTED_CHAT_FIELDS: dict[str, str] = {
    "functions": "functions is not supported; use tools",
    "function_call": "function_call is not supported; use tool_choice",
    "audio": "audio output is not supported",
    "prediction": "prediction (predicted outputs) is not supported",
    "web_search_options": "web_search_options is not supported",
    "reasoning_effort": "reasoning_effort is not supported",
    "verbosity": "verbosity is not supported",
    "moderation": "moderation is not supported",
    "prompt_cache_key": "prompt_cache_key is not supported (prefix caching is automatic)",
    "prompt_cache_retention": "prompt_cache_retention is not supported",
    "prompt_cache_options": "prompt_cache_options is not supported",
}


def check_unsupported(extra: dict[str, Any] | None) -> None:
    """Refuse set fields this server does not implement (ValueError naming the first)."""
    for name, message in UNSUPPORTED_CHAT_FIELDS.items():
        if (extra or {}).get(name) not in (None, [], {}):
            raise ValueError(message)
    if (extra or {}).get("store"):
        raise ValueError("store is not supported (this server keeps no completions)")
    modalities = (extra or {}).get("modalities")
    if modalities not in (None, ["text"]):
        raise ValueError("modalities: only ['text'] is supported")
    if not isinstance((extra or {}).get("safety_identifier", ""), str):
        raise ValueError("safety_identifier must be a string")
    tier = (extra or {}).get("service_tier")
    if tier not in (None, "auto", "default"):
        raise ValueError("service_tier: only 'auto' or 'default' is supported")
