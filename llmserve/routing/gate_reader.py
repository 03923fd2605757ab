"""Where the gate's evidence comes from: the trace ledger (SQLite) written by servers and router.

A version names either a router deployment (the router stores ``deployment`` and ``owner`` in
each row's ``extra``) or a ``model_version`` (a server's content hash), so the gate works on
ledgers written through the router and on ledgers of plain servers alike. A row written through
the router belongs to its deployment; its ``model_version`` is evidence for auditing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from llmserve.observability.ledger import connect
from llmserve.routing.gate import ComparisonSample, Decision, GateRules, TraceSample, decide


class EvidenceSource(Protocol):
    """What the gate needs to read; a test or another store can provide it."""

    def samples(self, version: str) -> list[TraceSample]: ...

    def comparisons(self, baseline: str, candidate: str) -> list[ComparisonSample]: ...


def _sample(row: sqlite3.Row) -> tuple[TraceSample, dict]:
    try:
        extra = json.loads(row["extra"]) if row["extra"] else {}
    except ValueError:
        extra = {}
    extra = extra if isinstance(extra, dict) else {}
    sample = TraceSample(
        status=row["status"], error_type=row["error_type"], ttft=row["ttft"], tpot=row["tpot"],
        e2e_latency=row["e2e_latency"], prompt_tokens=row["prompt_tokens"] or 0,
        completion_tokens=row["completion_tokens"] or 0, cost_usd=row["cost_usd"],
        model_version=row["model_version"], prompt_version=row["prompt_version"],
        owner=extra.get("owner") or None)
    return sample, extra


class LedgerSource:
    """Reads gate evidence from a trace ledger file (read-only)."""

    def __init__(self, path: str | Path, since: float | None = None,
                 until: float | None = None) -> None:
        self.path = str(path)
        self.since, self.until = since, until
        self._conn = connect(self.path, readonly=True)

    def close(self) -> None:
        self._conn.close()

    def _window(self, column: str) -> tuple[str, list[float]]:
        clauses, params = [], []
        if self.since is not None:
            clauses.append(f"{column} >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append(f"{column} < ?")
            params.append(self.until)
        return "".join(f" AND {c}" for c in clauses), params

    def samples(self, version: str) -> list[TraceSample]:
        """Rows of deployment ``version``, or rows with that model_version and no deployment."""
        where, params = self._window("start_time")
        # instr() pre-filters cheaply; the exact match on the decoded JSON happens below.
        rows = self._conn.execute(
            f"SELECT * FROM traces WHERE (model_version = ? OR instr(extra, ?) > 0){where} "
            "ORDER BY start_time, id", [version, json.dumps(version), *params])
        out = []
        for row in rows:
            sample, extra = _sample(row)
            deployment = extra.get("deployment")
            if deployment == version or (deployment is None and row["model_version"] == version):
                out.append(sample)
        return out

    def comparisons(self, baseline: str, candidate: str) -> list[ComparisonSample]:
        """Shadow comparisons of ``candidate`` (as shadow) against ``baseline`` (as primary)."""
        exists = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                    "name = 'router_shadow_comparisons'").fetchone()
        if not exists:
            return []
        where, params = self._window("created")
        rows = self._conn.execute(
            "SELECT exact_match, token_agreement FROM router_shadow_comparisons WHERE "
            "(primary_deployment = ? OR primary_model_version = ?) AND "
            f"(shadow_deployment = ? OR shadow_model_version = ?){where}",
            [baseline, baseline, candidate, candidate, *params])
        return [ComparisonSample(bool(r["exact_match"]), float(r["token_agreement"] or 0.0))
                for r in rows]


def evaluate(source: EvidenceSource, baseline: str, candidate: str,
             rules: GateRules | None = None) -> Decision:
    """Run the gate on what ``source`` holds for the two versions."""
    if baseline == candidate:
        raise ValueError("baseline and candidate must be different versions")
    base: Sequence[TraceSample] = source.samples(baseline)
    cand: Sequence[TraceSample] = source.samples(candidate)
    return decide(base, cand, source.comparisons(baseline, candidate), rules,
                  baseline_name=baseline, candidate_name=candidate)
