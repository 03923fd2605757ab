"""A single self-contained HTML cost report: inline SVG charts and tables, no scripts, no assets.

Charts: cost per day, cost per 1M tokens by model and prompt version, tokens by route. Every
string from the ledger (model names, prompt versions, routes) is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from llmserve.observability.report import METRICS, aggregate, format_value

_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948")
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ccc;padding:.3em .6em}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
tr.total td{font-weight:bold;background:#fafafa}.chart{margin:1em 0}.meta{color:#666}
"""


def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value``."""
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def bar_chart(title: str, categories: Sequence[str], series: Sequence[tuple[str, Sequence[float]]],
              *, stacked: bool = False, unit: str = "") -> str:
    """An SVG bar chart: one group (or stack) of bars per category, one colour per series."""
    width, height, left, bottom, top = 720, 300, 80, 70, 40
    plot_w, plot_h = width - left - 20, height - top - bottom
    sums = [sum(s[1][i] or 0 for s in series) for i in range(len(categories))]
    peak = max(sums if stacked else [v or 0 for _, vals in series for v in vals] or [0])
    axis_max = _nice_max(peak)
    slot = plot_w / max(1, len(categories))
    bar_w = slot * 0.7 / (1 if stacked else max(1, len(series)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
             f'height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="20" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    for i in range(5):  # horizontal grid lines with their values
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                     f'{html.escape(_axis_label(axis_max * i / 4, unit))}</text>')
    for ci, cat in enumerate(categories):
        x0 = left + ci * slot + slot * 0.15
        base = 0.0
        for si, (name, values) in enumerate(series):
            value = values[ci] or 0.0
            h = plot_h * value / axis_max
            x = x0 if stacked else x0 + si * bar_w
            y = top + plot_h - h - (plot_h * base / axis_max if stacked else 0)
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                         f'fill="{_COLORS[si % len(_COLORS)]}"><title>{html.escape(cat)} / '
                         f'{html.escape(name)}: {html.escape(_axis_label(value, unit))}</title></rect>')
            if not stacked and len(categories) * len(series) <= 36:  # room for value labels
                parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" font-size="9" '
                             f'text-anchor="middle">{html.escape(_axis_label(value, unit))}</text>')
            base += value if stacked else 0
        if stacked and len(categories) <= 36:
            parts.append(f'<text x="{x0 + bar_w / 2:.1f}" y="{top + plot_h - plot_h * base / axis_max - 3:.1f}" '
                         f'font-size="9" text-anchor="middle">{html.escape(_axis_label(base, unit))}</text>')
        label_x = left + ci * slot + slot / 2
        parts.append(f'<text x="{label_x:.1f}" y="{top + plot_h + 14}" font-size="10" '
                     f'text-anchor="end" transform="rotate(-30 {label_x:.1f} {top + plot_h + 14})">'
                     f'{html.escape(cat[:28])}</text>')
    for si, (name, _) in enumerate(series):  # legend
        lx = left + si * 150
        parts.append(f'<rect x="{lx}" y="{height - 14}" width="10" height="10" '
                     f'fill="{_COLORS[si % len(_COLORS)]}"/>')
        parts.append(f'<text x="{lx + 14}" y="{height - 5}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _axis_label(value: float, unit: str) -> str:
    if value == 0:
        return "$0" if unit == "$" else "0"
    if unit == "$":
        return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"


def _label(group: dict, keys: Sequence[str]) -> str:
    return " / ".join("(none)" if group.get(k) is None else str(group[k]) for k in keys)


def _table(report: dict[str, Any], caption: str) -> str:
    by = report["by"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in [*by, *METRICS])
    rows = []
    for g in report["groups"]:
        keys = "".join(f"<td>{html.escape('(none)' if g.get(k) is None else str(g[k]))}</td>" for k in by)
        vals = "".join(f'<td class="n">{html.escape(format_value(g.get(m), m))}</td>' for m in METRICS)
        rows.append(f"<tr>{keys}{vals}</tr>")
    total = report["total"]
    label = "".join("<td>TOTAL</td>" if i == 0 else "<td></td>" for i in range(len(by)))
    vals = "".join(f'<td class="n">{html.escape(format_value(total[m], m))}</td>' for m in METRICS)
    rows.append(f'<tr class="total">{label}{vals}</tr>')
    return (f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _time_range(since: float | None, until: float | None) -> str:
    fmt = lambda t: datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: E731
    return f"{fmt(since) if since else 'the beginning'} to {fmt(until) if until else 'now'}"


def render_html(rows: Sequence[dict], by: Sequence[str], *, since: float | None = None,
                until: float | None = None, generated_at: float | None = None) -> str:
    """The whole report as one HTML document."""
    main = aggregate(rows, by)
    per_day = aggregate(rows, ["day"])
    per_version = aggregate(rows, ["model", "prompt_version"])
    per_route = aggregate(rows, ["route"])
    days = [_label(g, ["day"]) for g in per_day["groups"]]
    charts = [
        bar_chart("Cost per day (USD)", days,
                  [("total cost", [g["total_cost_usd"] for g in per_day["groups"]])], unit="$"),
        bar_chart("Cost per 1M tokens by model and prompt version (USD)",
                  [_label(g, ["model", "prompt_version"]) for g in per_version["groups"]],
                  [(name, [g[key] or 0.0 for g in per_version["groups"]]) for name, key in
                   (("input", "cost_per_1m_input"), ("output", "cost_per_1m_output"),
                    ("blended", "cost_per_1m_blended"))], unit="$"),
        bar_chart("Tokens by route", [_label(g, ["route"]) for g in per_route["groups"]],
                  [("uncached prompt", [g["prompt_tokens"] - g["cached_tokens"] for g in per_route["groups"]]),
                   ("cached prompt", [g["cached_tokens"] for g in per_route["groups"]]),
                   ("completion", [g["completion_tokens"] for g in per_route["groups"]])],
                  stacked=True),
    ]
    stamp = datetime.fromtimestamp(generated_at or datetime.now(timezone.utc).timestamp(),
                                   tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = main["total"]
    summary = (f"{total['requests']:,} requests, total cost {html.escape(format_value(total['total_cost_usd'], 'cost'))}, "
               f"blended {html.escape(format_value(total['cost_per_1m_blended'], 'cost'))} per 1M tokens")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>llmserve cost report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>llmserve cost report</h1>",
        f'<p class="meta">Requests from {html.escape(_time_range(since, until))}; generated {stamp}.</p>',
        f"<p>{summary}</p>",
        "<h2>Charts</h2>", *charts,
        f"<h2>By {html.escape(', '.join(by) or 'all')}</h2>",
        _table(main, f"Grouped by {', '.join(by) or 'all'}"),
        "<h2>By day</h2>", _table(per_day, "Grouped by day (UTC)"),
        "<h2>By model and prompt version</h2>", _table(per_version, "Grouped by model, prompt_version"),
        "<h2>By route</h2>", _table(per_route, "Grouped by route"),
        "</body></html>", ""])
