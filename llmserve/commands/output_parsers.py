"""The output-parser flags that `serve` and `batch` share: how a chat answer's tool calls and
reasoning are told apart from its content."""

from __future__ import annotations

import argparse


def add_output_parser_args(p: argparse.ArgumentParser) -> None:
    """--tool-call-parser and --reasoning-parser (`serve` and `batch`)."""
    from llmserve.server.openai.reasoning import REASONING_PARSERS
    from llmserve.server.openai.tool_parsers import TOOL_PARSERS

    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="format of the model's tool calls, for requests with `tools` (default: "
                        "detected from the chat template; without one, such requests get 400)")
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split <think>...</think> reasoning into `reasoning_content`; tools and "
                        "response_format then constrain only the answer after it")
