"""`llmserve` command line: one subcommand per module under `llmserve.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module with `add_parser(subparsers)`; the parser sets `func(args) -> int`.
COMMANDS = {
    "serve": "llmserve.commands.serve",
    "generate": "llmserve.commands.generate",
    "batch": "llmserve.commands.batch",
    "report": "llmserve.commands.report",
    "router": "llmserve.commands.router",
    "gate": "llmserve.commands.gate",
    "bench": "llmserve.commands.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description="LLM serving engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # subcommand not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"llmserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
