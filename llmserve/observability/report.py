"""Cost-per-token reports from the trace ledger: aggregation plus table / CSV / JSON rendering.

Definitions (what finance reads):

- ``requests``: rows in the group; ``errors``: rows with status ``error`` (server or input
  failures); ``aborted``: rows the client cancelled; ``error_rate = errors / requests``.
- token columns are sums; ``cached_tokens`` are prompt tokens served from the prefix cache and
  are part of ``prompt_tokens``.
- ``total_cost_usd``: sum of every row's cost, aborted and failed rows included (they pay for
  what they computed). Rows of unpriced models count in ``unpriced`` and add no cost.
- ``cost_per_1m_input = input cost / prompt tokens * 1e6`` (input cost includes cached input),
  ``cost_per_1m_output = output cost / completion tokens * 1e6``,
  ``cost_per_1m_blended = total cost / (prompt + completion tokens) * 1e6``, with the tokens of
  priced rows only; empty when the denominator is zero.
- latency percentiles interpolate linearly between the closest ranks (numpy's default); ``day``
  is the UTC date of a request's start.
- ``response_format`` groups by the kind of output asked for (``text``, ``json_object``,
  ``json_schema``, ``regex``, ``choice``, ``grammar``, ``tools_required``); rows written before
  the column existed, or by a component that does not know it, group as ``(none)``.
  ``tool_calls`` is the sum of the tool calls in the rows' final outputs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

GROUP_KEYS = ("model", "model_version", "prompt_version", "route", "day", "endpoint", "status",
              "response_format")
FORMATS = ("table", "csv", "json", "html", "jsonl")
METRICS = (
    "requests", "errors", "aborted", "error_rate", "prompt_tokens", "cached_tokens",
    "completion_tokens", "total_cost_usd", "cost_per_1m_input", "cost_per_1m_output",
    "cost_per_1m_blended", "ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95", "unpriced", "tool_calls",
)
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str, now: float | None = None) -> float:
    """Unix seconds from ``2024-05-01``, ``2024-05-01T12:30[:00][+02:00]`` (UTC when no zone),
    a relative age such as ``30m``, ``24h``, ``7d`` (before now), or Unix seconds."""
    text = value.strip()
    now = time.time() if now is None else now
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"cannot read time {value!r}: use 2024-05-01, 2024-05-01T12:00, "
                         "24h, 7d or Unix seconds") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def parse_group_by(value: str | Sequence[str] | None) -> list[str]:
    """``"model,day"`` -> ``["model", "day"]``, rejecting unknown keys."""
    if value is None:
        return ["model"]
    parts = value.split(",") if isinstance(value, str) else list(value)
    keys = [p.strip() for p in parts if p.strip()]
    unknown = [k for k in keys if k not in GROUP_KEYS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}: choose from {', '.join(GROUP_KEYS)}")
    return keys


def day_of(ts: float) -> str:
    """The UTC date of a Unix time, as YYYY-MM-DD."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    data = sorted(v for v in values if v is not None and not math.isnan(v))
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _key(row: dict, by: Sequence[str]) -> tuple:
    return tuple(day_of(row["start_time"]) if k == "day" else row.get(k) for k in by)


def _ratio(num: float, den: float, scale: float = 1.0) -> float | None:
    return num / den * scale if den else None


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    """The report's metrics for one group of rows."""
    prompt = sum(r.get("prompt_tokens") or 0 for r in rows)
    completion = sum(r.get("completion_tokens") or 0 for r in rows)
    # Per-token costs divide by the tokens of priced rows only: an unpriced model's tokens
    # would otherwise make the priced ones look cheaper.
    priced = [r for r in rows if r.get("cost_usd") is not None]
    priced_prompt = sum(r.get("prompt_tokens") or 0 for r in priced)
    priced_completion = sum(r.get("completion_tokens") or 0 for r in priced)
    input_cost = sum(r.get("input_cost_usd") or 0.0 for r in rows)
    output_cost = sum(r.get("output_cost_usd") or 0.0 for r in rows)
    total_cost = sum(r.get("cost_usd") or 0.0 for r in rows)
    errors = sum(1 for r in rows if r.get("status") == "error")
    ttft = [r["ttft"] for r in rows if r.get("ttft") is not None]
    tpot = [r["tpot"] for r in rows if r.get("tpot") is not None]
    return {
        "requests": len(rows),
        "errors": errors,
        "aborted": sum(1 for r in rows if r.get("status") == "aborted"),
        "error_rate": _ratio(errors, len(rows)),
        "prompt_tokens": prompt,
        "cached_tokens": sum(r.get("cached_tokens") or 0 for r in rows),
        "completion_tokens": completion,
        "total_cost_usd": total_cost,
        "input_cost_usd": input_cost,
        "output_cost_usd": output_cost,
        "cost_per_1m_input": _ratio(input_cost, priced_prompt, 1e6),
        "cost_per_1m_output": _ratio(output_cost, priced_completion, 1e6),
        "cost_per_1m_blended": _ratio(total_cost, priced_prompt + priced_completion, 1e6),
        "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
        "tpot_p50": percentile(tpot, 50), "tpot_p95": percentile(tpot, 95),
        "unpriced": sum(1 for r in rows if r.get("cost_usd") is None),
        "tool_calls": sum(r.get("num_tool_calls") or 0 for r in rows),
    }


def aggregate(rows: Iterable[dict], by: Sequence[str]) -> dict[str, Any]:
    """Group ``rows`` by ``by`` and summarise each group plus the total.

    Returns ``{"by": [...], "groups": [{<key>: value, ...metrics}], "total": {...metrics}}``,
    groups sorted by key (missing values last).
    """
    rows = list(rows)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_key(row, by), []).append(row)
    ordered = sorted(groups, key=lambda k: tuple((v is None, str(v)) for v in k))
    out = [{**dict(zip(by, key, strict=True)), **summarize(groups[key])} for key in ordered]
    return {"by": list(by), "groups": out, "total": summarize(rows)}


def format_value(value: Any, metric: str = "") -> str:
    """A metric for display: percentages, milliseconds, dollars, thousands separators."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if metric == "error_rate":
            return f"{value * 100:.2f}%"
        if metric.startswith(("ttft", "tpot")):
            return f"{value * 1000:.1f}ms"
        if "cost" in metric:
            return f"${value:,.6f}" if abs(value) < 1 else f"${value:,.2f}"
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_table(report: dict[str, Any]) -> str:
    """A fixed-width text table, one line per group and a TOTAL line."""
    by = report["by"]
    header = [*by, *METRICS]
    lines = [[format_value(g.get(k), k) if k in METRICS else ("(none)" if g.get(k) is None else str(g[k]))
              for k in header] for g in report["groups"]]
    total = ["TOTAL" if i == 0 else "" for i in range(len(by))] + [format_value(report["total"][m], m) for m in METRICS]
    lines.append(total)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt_line = lambda cells: "  ".join(c.rjust(w) if i >= len(by) else c.ljust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    rule = "  ".join("-" * w for w in widths)
    body = [fmt_line(header), rule, *(fmt_line(line) for line in lines[:-1]), rule, fmt_line(lines[-1])]
    return "\n".join(body) + "\n"


def _clean(value: Any) -> Any:
    """Floats to 12 significant digits, so 0.1 + 0.2 reads 0.3 in a spreadsheet."""
    return float(f"{value:.12g}") if isinstance(value, float) else value


def render_csv(report: dict[str, Any]) -> str:
    """CSV with raw numbers (empty cells for missing values) and a final TOTAL row."""
    buf = io.StringIO()
    by = report["by"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*by, *METRICS])
    for g in report["groups"]:
        writer.writerow([("" if g.get(k) is None else _clean(g[k])) for k in [*by, *METRICS]])
    total = report["total"]
    writer.writerow([*(["TOTAL"] + [""] * (len(by) - 1) if by else []),
                     *("" if total[m] is None else _clean(total[m]) for m in METRICS)])
    return buf.getvalue()


def render_json(report: dict[str, Any], since: float | None = None, until: float | None = None) -> str:
    """The report as JSON, with its time range."""
    clean = {"by": report["by"], "total": {k: _clean(v) for k, v in report["total"].items()},
             "groups": [{k: _clean(v) for k, v in g.items()} for g in report["groups"]]}
    return json.dumps({"since": since, "until": until, **clean}, indent=2) + "\n"
