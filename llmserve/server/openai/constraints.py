"""What a request asks of its output: a constraint for the engine, tool and reasoning parsing.

`plan_output` reads `response_format`, vLLM's `structured_outputs` / `guided_*`, `tools`,
`tool_choice`, `parallel_tool_calls` and `logit_bias`, with the server's tool-call and reasoning
parsers, and returns an `OutputPlan`. Everything it refuses is a ValueError naming the field.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmserve.sampling_params import StructuredOutputsParams
from llmserve.server.openai.protocol import ChatCompletionRequest, SamplingFields
from llmserve.server.openai.reasoning import THINK_END, THINK_START, get_reasoning_parser
from llmserve.server.openai.tool_parsers import (
    TOOL_PARSERS,
    get_tool_parser,
    tool_call_grammar,
    tool_marker_tokens,
)
from llmserve.server.openai.tool_parsers.hermes import TOOL_CALL_END, TOOL_CALL_START
from llmserve.server.openai.tool_parsers.llama3 import PYTHON_TAG
from llmserve.server.openai.tool_parsers.mistral import ARGS, TOOL_CALLS

if TYPE_CHECKING:
    from llmserve.server.openai.reasoning import ReasoningParser
    from llmserve.server.openai.tool_parsers import ToolParser
    from llmserve.tokenizer import Tokenizer

# Format markers per parser: when the vocabulary has them as special tokens, the text must keep
# special tokens (or the parser never sees the marker) and the grammar must match the token.
_MARKERS = {"hermes": (TOOL_CALL_START, TOOL_CALL_END), "llama3_json": (PYTHON_TAG,),
            "mistral": (TOOL_CALLS, ARGS)}
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


@dataclass
class OutputPlan:
    """How a request's output is constrained and read back."""

    structured: StructuredOutputsParams | None = None
    kind: str = "text"  # the ledger's response_format column
    tool_parser: Callable[[], ToolParser] | None = None  # None: the text is not parsed
    reasoning_parser: Callable[[], ReasoningParser] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    keep_special_tokens: bool = False
    logit_bias: dict[int, float] | None = None

    def count_tool_calls(self, text: str) -> int:
        """Tool calls in a final completion text (the ledger's num_tool_calls)."""
        if self.tool_parser is None:
            return 0
        if self.reasoning_parser is not None:
            text = self.reasoning_parser().extract(text)[1] or ""
        return len(self.tool_parser().extract(text).calls)


def plan_output(req: SamplingFields, tokenizer: Tokenizer, tool_call_parser: str | None,
                reasoning_parser: str | None) -> OutputPlan:
    """The output plan of a validated chat or completion body (ValueError: 400)."""
    plan = OutputPlan(logit_bias=_logit_bias(req.logit_bias, tokenizer.vocab_size))
    plan.structured, plan.kind = _format_constraint(req)
    if isinstance(req, ChatCompletionRequest):
        _plan_tools(req, plan, tokenizer, tool_call_parser)
        if reasoning_parser is not None:
            parser_cls = get_reasoning_parser(reasoning_parser)
            plan.reasoning_parser = parser_cls
            plan.keep_special_tokens |= _any_special(tokenizer, (THINK_START, THINK_END))
    return plan


# Prompt tokens read to see whether a chat prompt leaves `<think>` open: the generation prompt
# ends right after it.
PROMPT_TAIL_TOKENS = 64


def read_prompt_reasoning(plan: OutputPlan, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
    """Make the plan's reasoning parser one for this prompt (`ReasoningParser.for_prompt`): a
    template that leaves `<think>` open (thinking-only Qwen3 templates, QwQ) makes the completion
    start inside the reasoning, which the model then closes without ever opening it."""
    parser = plan.reasoning_parser
    if parser is None:
        return
    tail = tokenizer.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
    for_prompt = getattr(parser, "for_prompt", None)
    if for_prompt is not None:
        plan.reasoning_parser = functools.partial(for_prompt, tail)


def after_reasoning(plan: OutputPlan, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
    """Start the constraint once the reasoning has ended, unless the prompt already ended it
    (a template that turns thinking off writes an empty `<think></think>` block itself)."""
    if plan.structured is None or plan.reasoning_parser is None:
        return
    parser = plan.reasoning_parser()
    end = tokenizer.encode(parser.end_marker, add_special_tokens=False)
    start = tokenizer.encode(parser.start_marker, add_special_tokens=False)
    last_end, last_start = _rfind(prompt_ids, end), _rfind(prompt_ids, start)
    if last_end >= 0 and last_end > last_start:
        return
    plan.structured.after_token_ids = tuple(end)


def _rfind(ids: list[int], sub: list[int]) -> int:
    n = len(sub)
    for i in range(len(ids) - n, -1, -1):
        if n and ids[i:i + n] == sub:
            return i
    return -1


def _format_constraint(req: SamplingFields) -> tuple[StructuredOutputsParams | None, str]:
    given = [name for name in ("response_format", "structured_outputs", *_GUIDED)
             if getattr(req, name) is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of {', '.join(given)}")
    if not given or (given == ["response_format"] and req.response_format.type == "text"):
        return None, "text"
    if req.response_format is not None:
        fmt = req.response_format
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True), "json_object"
        schema = fmt.json_schema.json_schema
        return StructuredOutputsParams(json=schema if schema is not None else {}), "json_schema"
    so = req.structured_outputs
    if so is not None:
        spec = StructuredOutputsParams(json=so.json_, json_object=bool(so.json_object),
                                       regex=so.regex, choice=so.choice, grammar=so.grammar)
    else:
        spec = StructuredOutputsParams(json=req.guided_json, regex=req.guided_regex,
                                       choice=req.guided_choice, grammar=req.guided_grammar)
    return spec, "json_schema" if spec.kind == "json" else spec.kind


def _plan_tools(req: ChatCompletionRequest, plan: OutputPlan, tokenizer: Tokenizer,
                parser_name: str | None) -> None:
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    choice = req.tool_choice
    choice = choice.model_dump() if hasattr(choice, "model_dump") else choice
    if tools:
        plan.template_kwargs["tools"] = tools
    elif choice not in (None, "none"):
        raise ValueError("tool_choice is only allowed when tools are given")
    if not tools or choice == "none":
        return  # tools described to the model (if any), but its text is not parsed
    if parser_name is None:
        raise ValueError("tools need a tool-call parser, and none was detected from the model's "
                         "chat template: start the server with --tool-call-parser (one of "
                         f"{', '.join(sorted(TOOL_PARSERS))})")
    parallel = req.parallel_tool_calls is not False
    parser_cls = get_tool_parser(parser_name)
    plan.tool_parser = lambda: parser_cls(parallel_tool_calls=parallel)
    markers = _MARKERS.get(parser_name, ())
    plan.keep_special_tokens |= _any_special(tokenizer, markers)
    # Every marker that is one token goes to the grammar by id, special or not: llguidance
    # matches an added token (Qwen's non-special `<tool_call>`) only by its id.
    grammar = tool_call_grammar(parser_name, tools, choice or "auto", parallel,
                                tool_marker_tokens(tokenizer))
    if grammar is None:
        plan.kind = "tools_auto" if plan.structured is None else plan.kind
        return
    if plan.structured is not None:
        raise ValueError("response_format or structured outputs cannot be combined with "
                         "tool_choice 'required' or a named function")
    plan.structured = StructuredOutputsParams(grammar=grammar)
    plan.kind = "tools_required" if choice == "required" else "tools_named"


def _any_special(tokenizer: Tokenizer, markers: tuple[str, ...]) -> bool:
    special = tokenizer.special_token_ids
    return any(tokenizer.token_to_id(m) in special for m in markers)


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"logit_bias keys must be token ids (integer strings), got {key!r}")
        token_id = int(key)
        if token_id >= vocab_size:
            raise ValueError(f"logit_bias token id {token_id} is outside the vocabulary "
                             f"[0, {vocab_size})")
        out[token_id] = float(value)
    return out
