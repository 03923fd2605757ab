"""`llmserve gate`: decide promote / hold / rollback for a candidate version from the ledger.

Exit codes: 0 promote, 1 hold, 2 rollback. Bad input (no ledger, bad rules file) exits 3, so a
pipeline never mistakes a typo for a rollback verdict.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_BAD_INPUT = 3


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gate", help="release gate: promote, hold or roll back a candidate version",
        description="Read the trace ledger and decide whether CANDIDATE may replace BASELINE. "
                    "Exit 0 promote, 1 hold, 2 rollback, 3 bad input.")
    p.add_argument("--trace-db", required=True, help="trace ledger (SQLite) to read")
    p.add_argument("--baseline", required=True,
                   help="baseline version: a router deployment name or a model_version")
    p.add_argument("--candidate", required=True,
                   help="candidate version: a router deployment name or a model_version")
    p.add_argument("--rules", help="gate rules YAML (see examples/gate.yaml); defaults otherwise")
    p.add_argument("--since", help="only traces since: 2024-05-01, 24h, 7d or Unix seconds")
    p.add_argument("--until", help="only traces before this time")
    p.add_argument("--format", choices=("both", "table", "json"), default="both",
                   help="print the evidence table, the JSON decision, or both (default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmserve.observability.report import parse_time
    from llmserve.routing.gate import GateRules, render_table
    from llmserve.routing.gate_reader import LedgerSource, evaluate
    from llmserve.routing.gate_rules import load_rules

    try:
        rules = load_rules(args.rules) if args.rules else GateRules()
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
        source = LedgerSource(args.trace_db, since=since, until=until)
        try:
            decision = evaluate(source, args.baseline, args.candidate, rules)
        finally:
            source.close()
    except ValueError as exc:
        print(f"llmserve gate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.format in ("both", "table"):
        print(render_table(decision))
    if args.format in ("both", "json"):
        print(json.dumps(decision.to_dict(), indent=2, sort_keys=True, default=_number))
    return decision.exit_code


def _number(value: object) -> object:
    return str(value)
