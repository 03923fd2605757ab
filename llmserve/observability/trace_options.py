"""The trace ledger's server options: ``--trace-db``, ``--pricing``, ``--log-prompts``,
``--otlp-endpoint``, and the ``TraceOptions`` they become."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TraceOptions:
    """Server options of the trace ledger (``llmserve serve --trace-db/--pricing/...``)."""

    trace_db: str
    pricing: str | None = None
    log_prompts: bool = False
    otlp_endpoint: str | None = None


def add_trace_args(parser: Any) -> None:
    """Add ``--trace-db``, ``--pricing``, ``--log-prompts``, ``--otlp-endpoint`` to a parser."""
    g = parser.add_argument_group("trace ledger")
    g.add_argument("--trace-db", default=None, metavar="PATH",
                   help="SQLite trace ledger, one row per request (default: $LLMSERVE_TRACE_DB "
                        "or ~/.local/state/llmserve/traces.db; 'off' disables it)")
    g.add_argument("--pricing", default=None, metavar="FILE",
                   help="TOML or YAML pricing file (list price or $/hour hardware) per model")
    g.add_argument("--log-prompts", action="store_true",
                   help="store prompt and completion text in the ledger (off by default)")
    g.add_argument("--otlp-endpoint", default=None, metavar="URL",
                   help="also export an OpenTelemetry span per request (needs llmserve[otlp])")


def trace_options_from_args(args: Any) -> TraceOptions | None:
    """TraceOptions from parsed ``add_trace_args`` options; None when the ledger is off.

    The pricing file is read here too, so a bad one fails before the model loads.
    """
    from llmserve.observability.ledger import default_trace_db_path
    from llmserve.observability.pricing import load_pricing

    path = args.trace_db or default_trace_db_path()
    if path.lower() in ("off", "none", "no"):
        if args.pricing or args.log_prompts or args.otlp_endpoint:
            raise ValueError("--pricing, --log-prompts and --otlp-endpoint need the trace ledger "
                             "(remove --trace-db off)")
        return None
    if args.pricing:
        load_pricing(args.pricing)
    return TraceOptions(path, args.pricing, bool(args.log_prompts), args.otlp_endpoint)
