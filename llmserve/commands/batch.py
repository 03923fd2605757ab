"""`llmserve batch`: run an OpenAI batch JSONL file offline, durably and resumably."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmserve.commands.engine_args import add_engine_args, engine_kwargs
from llmserve.commands.output_parsers import add_output_parser_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="run an OpenAI batch JSONL file offline",
        description="Run every request of an OpenAI batch input file (lines with custom_id, "
                    "method, url = /v1/chat/completions or /v1/completions, body) and write "
                    "OpenAI batch output lines. Results are appended and flushed as they "
                    "finish: after a crash, run the same command again to resume.")
    p.add_argument("input", help="batch input file (JSONL)")
    p.add_argument("-o", "--output", required=True, help="output file (JSONL; appended to)")
    p.add_argument("--errors", default=None,
                   help="file for failed lines (default: the output file)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names a line's body may give as `model` (default: the directory name)")
    p.add_argument("--max-pending", type=int, default=None,
                   help="lines handed to the scheduler at once (default: max(1024, 4 x "
                        "--max-num-seqs))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trace-db", default=None, metavar="PATH",
                   help="also write one trace-ledger row per request (route 'batch') to PATH")
    p.add_argument("--pricing", default=None, metavar="FILE",
                   help="pricing file for the trace-ledger costs (needs --trace-db)")
    add_output_parser_args(p)
    add_engine_args(p)
    p.set_defaults(func=run)


def check_paths(input_path: str, output: str, errors: str | None) -> None:
    """Refuse to write results over the input file."""
    src = Path(input_path).resolve()
    for name, path in (("--output", output), ("--errors", errors)):
        if path is not None and Path(path).resolve() == src:
            raise ValueError(f"{name} {path!r} is the input file; choose another path")


def _trace_recorder(args: argparse.Namespace, engine, model_name: str):
    """A trace recorder on --trace-db (None without it); the pricing file is read first."""
    if args.trace_db is None:
        if args.pricing:
            raise ValueError("--pricing needs --trace-db")
        return None
    from llmserve.models.version import compute_model_version
    from llmserve.observability.ledger import TraceLedger
    from llmserve.observability.pricing import load_pricing
    from llmserve.observability.recorder import TraceRecorder

    pricing = load_pricing(args.pricing) if args.pricing else None
    return TraceRecorder(TraceLedger(args.trace_db), engine, model_name=model_name,
                         model_version=compute_model_version(engine.config.model.model),
                         pricing=pricing,
                         chat_template_hash=engine.tokenizer.chat_template_hash)


def _report_invalid(bad: list) -> None:
    for b in bad:
        print(f"llmserve batch: line {b.line.line} ({b.line.custom_id}): {b.status} {b.message}",
              file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from llmserve.batch.lines import read_batch_file
    from llmserve.batch.progress import ResultLog
    from llmserve.batch.runner import BatchRunner
    from llmserve.engine.llm_engine import LLMEngine

    check_paths(args.input, args.output, args.errors)
    lines = read_batch_file(args.input)  # every structural problem, with line numbers
    log = ResultLog(args.output, args.errors).open()
    try:
        unknown = log.done - {line.custom_id for line in lines}
        if unknown:
            raise ValueError(
                f"{args.output!r} already holds results for custom_ids that are not in "
                f"{args.input!r} (e.g. {sorted(unknown)[0]!r}); it belongs to another job")
        if len(log.done) == len(lines):
            print(f"llmserve batch: all {len(lines)} requests already done", file=sys.stderr)
            return 0
        engine = LLMEngine.from_args(**engine_kwargs(args))
        names = args.served_model_name or [engine.model_name]
        recorder = _trace_recorder(args, engine, names[0])
        runner = BatchRunner(engine, names, args.max_pending, use_tqdm=not args.no_progress,
                             observers=[recorder] if recorder else [],
                             parsers=(args.tool_call_parser, args.reasoning_parser))
        try:
            summary = runner.run(lines, log, on_invalid=_report_invalid)
        finally:
            if recorder is not None:
                recorder.close()
    finally:
        log.close()
    where = f" (see {args.errors})" if args.errors and summary.failed else ""
    print(f"llmserve batch: {summary.completed} completed, {summary.failed} failed{where}, "
          f"{summary.skipped} already done; {summary.completion_tokens} output tokens in "
          f"{summary.elapsed:.1f}s ({summary.output_tokens_per_s:.1f} tok/s)", file=sys.stderr)
    return 0
