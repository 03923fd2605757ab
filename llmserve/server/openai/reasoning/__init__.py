"""Reasoning parsers: `--reasoning-parser qwen3 | deepseek_r1`.

    parser = get_reasoning_parser("qwen3").for_prompt(rendered_prompt)  # or ()
    reasoning, content = parser.extract(text)
    stream = parser.stream(); r, c = stream.feed(delta); r, c = stream.finish()
    parser.end_marker  # "</think>": the constraint of a request starts after it, unless
    parser.constraint_after_reasoning  # is False (the prompt already closed the reasoning)
"""

from __future__ import annotations

from llmserve.server.openai.reasoning.parser import (
    THINK_END,
    THINK_START,
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParser,
    ReasoningStream,
)

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered under `name`; ValueError names the known ones."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; "
                         f"choose one of {sorted(REASONING_PARSERS)}") from None


__all__ = [
    "REASONING_PARSERS", "THINK_END", "THINK_START", "DeepSeekR1ReasoningParser",
    "Qwen3ReasoningParser", "ReasoningParser", "ReasoningStream", "get_reasoning_parser",
]
