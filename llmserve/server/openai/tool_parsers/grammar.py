"""Grammars (Lark, llguidance dialect) that force a model's native tool-call format.

Used for `tool_choice: "required"` (one call or more; exactly one when parallel calls are
off) and for a named function (exactly one call of it). Each call's arguments are held to
that tool's `parameters` JSON schema through `%json`, and the JSON is laid out the way the
chat templates show it (`", "` and `": "` separators, no other whitespace), so the text is
what the matching parser reads back.

A format marker that is a token of the model's vocabulary (Qwen's `<tool_call>`, Mistral's
`[TOOL_CALLS]`) must be matched as that token, not spelled out: pass `special_tokens` (text ->
id, see `tool_marker_tokens`) and such markers become `<[id]>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from llmserve.server.openai.tool_parsers.hermes import TOOL_CALL_END, TOOL_CALL_START
from llmserve.server.openai.tool_parsers.mistral import ARGS, TOOL_CALLS

# OpenAI's rule for function names; it also keeps them safe inside a Lark string literal.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MARKERS = (TOOL_CALL_START, TOOL_CALL_END, TOOL_CALLS, ARGS)
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def tool_call_grammar(parser_name: str, tools: Sequence, tool_choice: object,
                      parallel_tool_calls: bool = True,
                      special_tokens: Mapping[str, int] | None = None) -> str | None:
    """The grammar for this request, or None when `tool_choice` leaves the model free
    ("auto", "none" or absent).

    `tools` are OpenAI tool entries (dicts, or pydantic models); `tool_choice` is a string or
    `{"type": "function", "function": {"name": ...}}`. Raises ValueError for an unknown
    parser, a malformed tool, or a named function that is not among the tools.
    """
    functions = _functions(tools)
    chosen = _chosen(tool_choice, functions)
    if chosen is None:
        return None
    single = not parallel_tool_calls or len(chosen) == 1 and tool_choice != "required"
    tokens = dict(special_tokens or {})
    if parser_name == "hermes":
        return _hermes(chosen, single, tokens)
    if parser_name == "llama3_json":
        body = _calls_json(chosen, "parameters")
        return _grammar('body ("; " body)*' if not single else "body", {"body": body})
    if parser_name == "mistral":
        return _mistral(chosen, single, tokens)
    raise ValueError(f"no tool-call grammar for parser {parser_name!r}")


def tool_marker_tokens(tokenizer) -> dict[str, int]:
    """The format markers that are single tokens of this tokenizer (text -> id), for
    `tool_call_grammar(special_tokens=...)`. llguidance matches every added token (Qwen's
    `<tool_call>`, special or not) only by its id, never by its text, so a grammar must name
    them as tokens. Takes anything with `token_to_id(text)` (llmserve's Tokenizer)."""
    found = {m: tokenizer.token_to_id(m) for m in _MARKERS}
    return {m: i for m, i in found.items() if i is not None}


def _functions(tools: Sequence) -> dict[str, dict]:
    """name -> parameters schema, checked."""
    out: dict[str, dict] = {}
    for tool in tools or ():
        if hasattr(tool, "model_dump"):
            tool = tool.model_dump(exclude_none=True)
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise ValueError("each tool must be {'type': 'function', 'function': {...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise ValueError(f"tool function name {name!r} must be 1-64 letters, digits, "
                             "underscores, dots or dashes")
        params = fn.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise ValueError(f"tool {name!r}: parameters must be a JSON schema object")
        out[name] = params
    return out


def _chosen(tool_choice: object, functions: dict[str, dict]) -> dict[str, dict] | None:
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump(exclude_none=True)
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        if not functions:
            raise ValueError("tool_choice 'required' needs at least one tool")
        return functions
    name = None
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
    if not isinstance(name, str):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}")
    if name not in functions:
        raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
    return {name: functions[name]}


def _call_schema(name: str, params: dict, args_key: str) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def _calls_json(functions: dict[str, dict], args_key: str) -> str:
    """`%json` of one `{"name": ..., args_key: {...}}` object for any of the functions."""
    defs: dict = {}
    options = [_call_schema(n, _hoist_defs(p, f"t{k}_", defs), args_key)
               for k, (n, p) in enumerate(functions.items())]
    schema = {"anyOf": options} if len(options) > 1 else options[0]
    return _json_rule(schema, defs)


def _args_json(params: dict) -> str:
    defs: dict = {}
    return _json_rule({"allOf": [_hoist_defs(params, "", defs)]}, defs)


def _json_rule(schema: dict, defs: dict) -> str:
    schema = {"x-guidance": _JSON_LAYOUT, **schema, **({"$defs": defs} if defs else {})}
    return "%json " + json.dumps(schema)


def _hoist_defs(params: dict, prefix: str, defs: dict) -> dict:
    """Move a tool's `$defs`/`definitions` to the root of the combined schema, renamed with
    `prefix` so that tools cannot clash, and point its `$ref`s there."""
    own = {**params.get("definitions", {}), **params.get("$defs", {})}
    if not own:
        return params

    def fix(node: object) -> object:
        if isinstance(node, dict):
            out = {k: fix(v) for k, v in node.items() if k not in ("$defs", "definitions")}
            ref = node.get("$ref")
            for root in ("#/$defs/", "#/definitions/"):
                if isinstance(ref, str) and ref.startswith(root):
                    out["$ref"] = "#/$defs/" + prefix + ref[len(root):]
            return out
        return [fix(v) for v in node] if isinstance(node, list) else node

    defs.update({prefix + k: fix(v) for k, v in own.items()})
    return fix(params)


def _tok(text: str, special_tokens: dict[str, int]) -> str:
    """A marker as a special token when the vocabulary has it as one, else as text."""
    if text in special_tokens:
        return f"<[{int(special_tokens[text])}]>"
    return json.dumps(text)


def _grammar(start: str, rules: dict[str, str]) -> str:
    return "\n".join([f"start: {start}"] + [f"{k}: {v}" for k, v in rules.items()]) + "\n"


def _hermes(functions: dict[str, dict], single: bool, tokens: dict[str, int]) -> str:
    call = (f'{_tok(TOOL_CALL_START, tokens)} "\\n" body "\\n" '
            f'{_tok(TOOL_CALL_END, tokens)}')
    # Qwen3 writes "\n\n" after </think> before its calls: allow that much, no more.
    return _grammar("LEAD? call" if single else 'LEAD? call ("\\n" call)*',
                    {"call": call, "body": _calls_json(functions, "arguments"),
                     "LEAD": "/\\n\\n?/"})


def _mistral(functions: dict[str, dict], single: bool, tokens: dict[str, int]) -> str:
    marker = _tok(TOOL_CALLS, tokens)
    if ARGS not in tokens:  # the list form: [TOOL_CALLS][{...}, {...}]
        start = f'{marker} "[" body "]"' if single else f'{marker} "[" body (", " body)* "]"'
        return _grammar(start, {"body": _calls_json(functions, "arguments")})
    # v11 tokenizers have an [ARGS] token: [TOOL_CALLS]name[ARGS]{...}, repeated.
    rules = {f"call_{k}": f'{marker} {json.dumps(n)} {_tok(ARGS, tokens)} args_{k}'
             for k, n in enumerate(functions)}
    rules.update({f"args_{k}": _args_json(p) for k, p in enumerate(functions.values())})
    rules["call"] = " | ".join(f"call_{k}" for k in range(len(functions)))
    return _grammar("call" if single else "call+", rules)
