"""Cost-per-token reports against hand-computed figures from a fixed set of traces."""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser

import pytest

from llmserve.cli import main as cli_main
from llmserve.observability.ledger import TraceLedger, TraceRecord
from llmserve.observability.report import (
    aggregate,
    parse_group_by,
    parse_time,
    percentile,
    render_csv,
    render_table,
)
from llmserve.observability.report_html import render_html

DAY1 = 1714521600.0  # 2024-05-01T00:00:00Z
DAY2 = DAY1 + 86400
# (model, prompt_version, route, start, status, prompt, cached, completion, input $, output $,
#  cost $ or None for unpriced, ttft, tpot)
FIXED = [
    ("A", "v1", "primary", DAY1 + 36000, "ok", 1000, 200, 100, 0.002, 0.001, 0.003, 0.1, 0.01),
    ("A", "v1", "primary", DAY1 + 36010, "ok", 500, 0, 50, 0.001, 0.0005, 0.0015, 0.3, 0.02),
    ("A", "v2", "canary", DAY2 + 100, "ok", 2000, 1000, 200, 0.003, 0.002, 0.005, 0.2, 0.03),
    ("A", "v2", "canary", DAY2 + 200, "error", 100, 0, 0, 0.0001, 0.0, 0.0001, None, None),
    ("B", None, "primary", DAY2 + 300, "aborted", 300, 0, 0, 0.0002, 0.0, 0.0002, None, None),
    ("B", None, "primary", DAY2 + 400, "ok", 400, 0, 40, None, None, None, 0.5, 0.05),
]


def _rows() -> list[dict]:
    keys = ("model", "prompt_version", "route", "start_time", "status", "prompt_tokens",
            "cached_tokens", "completion_tokens", "input_cost_usd", "output_cost_usd", "cost_usd",
            "ttft", "tpot")
    return [dict(zip(keys, values, strict=True), request_id=f"r{i}") for i, values in enumerate(FIXED)]


def test_report_by_model_matches_hand_computed_figures():
    report = aggregate(_rows(), ["model"])
    a, b = report["groups"]
    assert (a["model"], a["requests"], a["errors"], a["aborted"]) == ("A", 4, 1, 0)
    assert a["error_rate"] == pytest.approx(0.25)
    assert (a["prompt_tokens"], a["cached_tokens"], a["completion_tokens"]) == (3600, 1200, 350)
    assert a["total_cost_usd"] == pytest.approx(0.0096)
    assert a["cost_per_1m_input"] == pytest.approx(0.0061 / 3600 * 1e6)
    assert a["cost_per_1m_output"] == pytest.approx(10.0)
    assert a["cost_per_1m_blended"] == pytest.approx(0.0096 / 3950 * 1e6)
    assert (a["ttft_p50"], a["ttft_p95"]) == (pytest.approx(0.2), pytest.approx(0.29))
    assert (a["tpot_p50"], a["tpot_p95"]) == (pytest.approx(0.02), pytest.approx(0.029))
    assert (b["requests"], b["aborted"], b["error_rate"], b["unpriced"]) == (2, 1, 0.0, 1)
    # B's second row is unpriced: its tokens stay out of the per-token costs.
    assert b["cost_per_1m_input"] == pytest.approx(0.0002 / 300 * 1e6)
    assert b["cost_per_1m_output"] is None
    assert b["cost_per_1m_blended"] == pytest.approx(0.0002 / 300 * 1e6)
    assert b["ttft_p50"] == b["ttft_p95"] == pytest.approx(0.5)
    total = report["total"]
    assert (total["requests"], total["errors"]) == (6, 1)
    assert total["total_cost_usd"] == pytest.approx(0.0098)
    assert total["error_rate"] == pytest.approx(1 / 6)
    assert total["cost_per_1m_input"] == pytest.approx(0.0063 / 3900 * 1e6)
    assert total["cost_per_1m_blended"] == pytest.approx(0.0098 / (3900 + 350) * 1e6)


def test_report_by_day_and_prompt_version_groups_and_orders_keys():
    by_day = aggregate(_rows(), ["day"])
    assert [(g["day"], g["requests"]) for g in by_day["groups"]] == [("2024-05-01", 2), ("2024-05-02", 4)]
    assert [g["total_cost_usd"] for g in by_day["groups"]] == [pytest.approx(0.0045), pytest.approx(0.0053)]
    by_version = aggregate(_rows(), ["model", "prompt_version"])
    assert [(g["model"], g["prompt_version"]) for g in by_version["groups"]] == [
        ("A", "v1"), ("A", "v2"), ("B", None)]
    v2 = by_version["groups"][1]
    assert v2["cost_per_1m_blended"] == pytest.approx(0.0051 / 2300 * 1e6)


def test_percentile_interpolates_linearly_and_ignores_missing():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([], 50) is None


def test_csv_and_table_carry_the_same_totals():
    report = aggregate(_rows(), ["model", "route"])
    parsed = list(csv.DictReader(io.StringIO(render_csv(report))))
    assert [r["model"] for r in parsed] == ["A", "A", "B", "TOTAL"]
    assert float(parsed[-1]["total_cost_usd"]) == pytest.approx(0.0098)
    assert parsed[2]["cost_per_1m_output"] == ""  # B: no priced completion tokens
    assert parsed[-1]["total_cost_usd"] == "0.0098"  # rounded, not 0.009800000000000001
    table = render_table(report)
    assert table.splitlines()[-1].startswith("TOTAL")
    assert "50.00%" in table and "canary" in table  # A on canary: 1 error in 2


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.svg_rects = 0
        self.in_svg = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.in_svg += tag == "svg"
        self.svg_rects += tag == "rect" and self.in_svg > 0

    def handle_endtag(self, tag):
        self.in_svg -= tag == "svg"

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_has_charts_and_tables_and_escapes_ledger_strings():
    rows = _rows()
    rows[0]["prompt_version"] = "<script>alert(1)</script>"
    page = render_html(rows, ["model"], since=DAY1, until=DAY2 + 86400)
    parser = _Collector()
    parser.feed(page)
    text = "".join(parser.text)
    assert parser.tags.get("svg") == 3
    assert parser.svg_rects >= 6 + 3  # bars plus legend swatches
    assert parser.tags.get("table") == 4
    assert "script" not in parser.tags and "<script>alert(1)</script>" in text
    for title in ("Cost per day", "Cost per 1M tokens by model and prompt version", "Tokens by route"):
        assert title in text
    assert "2024-05-01" in text and "canary" in text and "TOTAL" in text


@pytest.mark.parametrize("text, expected", [
    ("2024-05-01", DAY1), ("2024-05-01T10:00", DAY1 + 36000), ("2024-05-01T12:00+02:00", DAY1 + 36000),
    ("2024-05-01T10:00:00Z", DAY1 + 36000), ("24h", 1e9 - 86400), ("30m", 1e9 - 1800), ("1714521600", DAY1),
])
def test_parse_time_accepts_dates_relative_ages_and_epochs(text, expected):
    assert parse_time(text, now=1e9) == pytest.approx(expected)


def test_bad_time_and_group_key_raise_value_error():
    with pytest.raises(ValueError, match="cannot read time"):
        parse_time("yesterday-ish")
    with pytest.raises(ValueError, match="cannot group by user"):
        parse_group_by("model,user")


def _ledger(tmp_path) -> str:
    db = str(tmp_path / "t.db")
    with TraceLedger(db) as ledger:
        for i, row in enumerate(_rows()):
            fields = {k: v for k, v in row.items() if k not in ("request_id",)}
            ledger.submit(TraceRecord(trace_id=f"{i + 1:032x}", request_id=f"r{i}", **fields))
    return db


def test_report_command_writes_json_and_filters_by_time(tmp_path, capsys):
    db = _ledger(tmp_path)
    out = tmp_path / "r.json"
    argv = ["report", "--trace-db", db, "--by", "model,day", "--format", "json", "-o", str(out),
            "--since", "2024-05-02"]
    assert cli_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["by"] == ["model", "day"]
    assert data["total"]["requests"] == 4
    assert data["total"]["total_cost_usd"] == pytest.approx(0.0053)
    assert cli_main(["report", "--trace-db", db, "--format", "table"]) == 0
    assert "TOTAL" in capsys.readouterr().out


def test_report_command_exports_jsonl_and_html(tmp_path, capsys):
    db = _ledger(tmp_path)
    assert cli_main(["report", "--trace-db", db, "--format", "jsonl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [f"r{i}" for i in range(6)]
    html_path = tmp_path / "r.html"
    assert cli_main(["report", "--trace-db", db, "--format", "html", "-o", str(html_path)]) == 0
    assert html_path.read_text().count("<svg") == 3


def test_report_command_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert cli_main(["report", "--trace-db", str(tmp_path / "missing.db")]) == 2
    assert "no trace ledger" in capsys.readouterr().err
    db = _ledger(tmp_path)
    assert cli_main(["report", "--trace-db", db, "--by", "colour"]) == 2
    assert cli_main(["report", "--trace-db", db, "--since", "2024-05-02", "--until", "2024-05-01"]) == 2
