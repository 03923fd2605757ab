"""`llmserve report`: cost-per-token reports from the trace ledger."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``llmserve report``."""
    parser = subparsers.add_parser(
        "report", help="cost-per-token report from the trace ledger",
        description="Requests, error rate, tokens, cost, cost per 1M tokens and latency "
                    "percentiles from the trace ledger, grouped as asked.")
    parser.add_argument("--trace-db", default=None, metavar="PATH",
                        help="trace ledger database (default: $LLMSERVE_TRACE_DB or "
                             "~/.local/state/llmserve/traces.db)")
    parser.add_argument("--since", default=None,
                        help="first request time: 2024-05-01, 2024-05-01T12:00 (UTC unless a zone "
                             "is given), 24h, 7d or Unix seconds")
    parser.add_argument("--until", default=None, help="end of the range (exclusive), same forms")
    parser.add_argument("--by", default="model",
                        help="comma-separated grouping: model, model_version, prompt_version, "
                             "route, day, endpoint, status, response_format (default: model)")
    parser.add_argument("--format", default="table",
                        choices=("table", "csv", "json", "html", "jsonl"),
                        help="output format; jsonl exports the raw rows (default: table)")
    parser.add_argument("-o", "--output", default=None, metavar="FILE",
                        help="write to FILE instead of standard output")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the report; ValueError for bad input (the CLI prints it and exits 2)."""
    from llmserve.observability import ledger, report

    db = args.trace_db or ledger.default_trace_db_path()
    now = time.time()
    since = report.parse_time(args.since, now) if args.since else None
    until = report.parse_time(args.until, now) if args.until else None
    if since is not None and until is not None and since >= until:
        raise ValueError("--since must be before --until")
    by = report.parse_group_by(args.by)
    if not Path(db).is_file():
        raise ValueError(f"no trace ledger at {db!r}: pass --trace-db PATH")
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.format == "jsonl":
            ledger.export_jsonl(db, out, since, until)
            return 0
        rows = ledger.query_rows(db, since, until)
        out.write(_render(args.format, rows, by, since, until))
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"wrote {args.format} report of {len(rows)} requests to {Path(args.output)}",
              file=sys.stderr)
    return 0


def _render(fmt: str, rows: list[dict], by: list[str], since: float | None,
            until: float | None) -> str:
    from llmserve.observability import report

    if fmt == "html":
        from llmserve.observability.report_html import render_html

        return render_html(rows, by, since=since, until=until)
    data = report.aggregate(rows, by)
    if fmt == "csv":
        return report.render_csv(data)
    if fmt == "json":
        return report.render_json(data, since, until)
    return report.render_table(data)
