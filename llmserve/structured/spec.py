"""GrammarSpec: a constraint reduced to a hashable (kind, text) pair, the grammar cache's key."""

from __future__ import annotations

import json
from dataclasses import dataclass

from llmserve.sampling_params import StructuredOutputsParams

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GrammarSpec:
    """`kind` is one of KINDS; `text` is the canonical source: a JSON schema serialised with
    sorted keys (so equal schemas share a cache entry), a regex, a JSON list of choices or a
    Lark grammar. `json_object` has an empty text."""

    kind: str
    text: str

    @classmethod
    def from_params(cls, params: StructuredOutputsParams) -> GrammarSpec:
        """The spec of a request's `structured_outputs`. Raises ValueError for a schema that
        is not JSON or not an object."""
        kind = params.kind
        if kind == "json":
            return cls(kind, canonical_schema(params.json))
        if kind == "json_object":
            return cls(kind, "")
        if kind == "choice":
            return cls(kind, json.dumps(list(params.choice)))
        value = getattr(params, kind)
        if not isinstance(value, str) or not value:
            raise ValueError(f"structured_outputs.{kind} must be a non-empty string")
        return cls(kind, value)

    def schema(self) -> dict:
        """The JSON schema of a `json` / `json_object` spec."""
        return json.loads(self.text) if self.kind == "json" else {"type": "object"}

    def choices(self) -> list[str]:
        return json.loads(self.text)


def canonical_schema(schema: dict | str | None) -> str:
    """A schema (dict or JSON text) as JSON with sorted keys; ValueError when it is neither a
    JSON object nor a boolean schema."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError("structured_outputs.json must be a JSON schema object, got "
                         f"{type(schema).__name__}")
    try:
        return json.dumps(schema, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"structured_outputs.json is not serialisable as JSON: {exc}") from None
