"""The release gate on fixed ledgers: good, slow, erroring and non-auditable candidates."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest

from llmserve.cli import main
from llmserve.observability.ledger import TraceLedger, TraceRecord
from llmserve.routing.gate import GateRules, TraceSample, decide, ks_statistic
from llmserve.routing.gate_rules import load_rules, parse_rules
from llmserve.routing.records import COMPARISONS_SQL

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _rows(name: str, n: int, seed: int, slow: float = 1.0, error_rate: float = 0.0,
          owner: str | None = "team@example.com", prompt_version: str | None = "p1",
          model_version: str | None = "auto", cost_factor: float = 1.0, length: int = 50):
    rng = random.Random(seed)
    for i in range(n):
        failed = rng.random() < error_rate
        tokens = 0 if failed else rng.randint(length - 10, length + 10)
        yield TraceRecord(
            trace_id=f"{seed:08x}{i:024x}", request_id=f"{name}-{i}", start_time=1000.0 + i,
            status="error" if failed else "ok", error_type="server_error" if failed else None,
            model="chat", model_version=f"mv-{name}" if model_version == "auto" else model_version,
            prompt_version=prompt_version, route="canary", prompt_tokens=20,
            completion_tokens=tokens, ttft=None if failed else rng.uniform(0.09, 0.11) * slow,
            tpot=None if failed else rng.uniform(0.019, 0.021) * slow,
            cost_usd=(20 + tokens) * 1e-6 * cost_factor,
            extra={"deployment": name, "owner": owner} if owner else {"deployment": name})


@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gate") / "traces.db")
    with TraceLedger(path) as led:
        sets = [
            _rows("v1", 300, 1), _rows("good", 200, 2), _rows("slow", 200, 3, slow=3.0),
            _rows("sluggish", 200, 4, slow=1.5), _rows("erroring", 200, 5, error_rate=0.3),
            _rows("no-prompt-version", 200, 6, prompt_version=None),
            _rows("no-owner", 200, 7, owner=None), _rows("no-model-version", 200, 8, model_version=None),
            _rows("pricey", 200, 9, cost_factor=2.0), _rows("verbose", 200, 10, length=150),
            _rows("few", 10, 11),
        ]
        for rows in sets:
            for record in rows:
                led.submit(record)
        led.flush()
    return path


def _gate(ledger: str, candidate: str, capsys, *extra: str) -> tuple[int, dict, str]:
    code = main(["gate", "--trace-db", ledger, "--baseline", "v1", "--candidate", candidate, *extra])
    out = capsys.readouterr().out
    table, _, doc = out.partition("\n{")
    return code, json.loads("{" + doc), table


def test_good_candidate_is_promoted_and_owner_named(ledger, capsys):
    code, doc, table = _gate(ledger, "good", capsys)
    assert code == 0 and doc["action"] == "promote"
    assert doc["owner"] == "team@example.com" and "owner: team@example.com" in table
    assert {e["verdict"] for e in doc["evidence"]} <= {"ok", "n/a"}


@pytest.mark.parametrize("candidate, metric", [("slow", "ttft_p95_ratio"),
                                               ("erroring", "error_rate"),
                                               ("pricey", "cost_per_token_ratio"),
                                               ("verbose", "length_drift")])
def test_broken_candidates_are_rolled_back_naming_the_failed_rule(ledger, capsys, candidate, metric):
    code, doc, table = _gate(ledger, candidate, capsys)
    assert code == 2 and doc["action"] == "rollback"
    verdicts = {e["metric"]: e["verdict"] for e in doc["evidence"]}
    assert verdicts[metric] == "rollback"
    assert "ROLLBACK" in table


def test_moderately_slow_candidate_is_held(ledger, capsys):
    code, doc, _ = _gate(ledger, "sluggish", capsys)
    assert code == 1 and doc["action"] == "hold"
    assert any("ttft_p95_ratio" in r for r in doc["reasons"])


@pytest.mark.parametrize("candidate, missing", [("no-prompt-version", "prompt_version"),
                                                ("no-owner", "owner"),
                                                ("no-model-version", "model_version")])
def test_non_auditable_candidate_is_never_promoted(ledger, capsys, candidate, missing):
    code, doc, _ = _gate(ledger, candidate, capsys)
    assert code == 1 and doc["auditable"] is False
    assert doc["audit"][f"missing_{missing}"] == 200
    assert any("not auditable" in r and missing in r for r in doc["reasons"])


def test_too_few_samples_hold_instead_of_promote(ledger, capsys):
    code, doc, _ = _gate(ledger, "few", capsys)
    assert code == 1 and any("needs 100" in r for r in doc["reasons"])


def test_time_window_limits_the_evidence(ledger, capsys):
    # Rows start at t=1000+i: a window of [1000, 1050) keeps 50 of each version.
    code, doc, _ = _gate(ledger, "good", capsys, "--since", "1000", "--until", "1050")
    assert doc["samples"]["candidate"] == 50 and doc["samples"]["baseline"] == 50
    assert code == 1  # 50 candidate requests are too few to promote


def test_rules_file_changes_the_verdict_and_bad_input_exits_3(ledger, capsys, tmp_path):
    rules = tmp_path / "lenient.yaml"
    rules.write_text("rules:\n  ttft_p95_ratio: {hold: 4, rollback: 5}\n  tpot_p95_ratio: null\n")
    code, doc, _ = _gate(ledger, "slow", capsys, "--rules", str(rules))
    assert code == 0, doc["reasons"]
    rules.write_text("rules:\n  ttft_p99: {hold: 1}\n")
    assert main(["gate", "--trace-db", ledger, "--baseline", "v1", "--candidate", "good",
                 "--rules", str(rules)]) == 3
    assert "unknown rule" in capsys.readouterr().err
    assert main(["gate", "--trace-db", str(tmp_path / "none.db"), "--baseline", "a",
                 "--candidate", "b"]) == 3


def test_shadow_disagreement_blocks_promotion(ledger, capsys, tmp_path):
    db = tmp_path / "copy.db"
    src = sqlite3.connect(ledger)
    src.backup(dst := sqlite3.connect(db))
    src.close()
    dst.execute(COMPARISONS_SQL)
    dst.executemany(
        "INSERT INTO router_shadow_comparisons (trace_id, created, primary_deployment, "
        "shadow_deployment, exact_match, token_agreement) VALUES (?, ?, 'v1', 'good', ?, ?)",
        [(f"t{i}", 1000.0 + i, 0, 0.7) for i in range(30)])
    dst.commit()
    dst.close()
    code, doc, _ = _gate(str(db), "good", capsys)
    assert code == 1
    agreement = next(e for e in doc["evidence"] if e["metric"] == "shadow_agreement")
    assert agreement["value"] == pytest.approx(0.7) and agreement["verdict"] == "hold"


def test_version_can_be_a_model_version_of_plain_server_rows(tmp_path, capsys):
    path = str(tmp_path / "plain.db")
    with TraceLedger(path) as led:
        for name, seed in (("aaa", 1), ("bbb", 2)):
            for r in _rows(name, 150, seed):
                r.extra = {"owner": "ops@example.com"}
                r.model_version = name
                led.submit(r)
    code = main(["gate", "--trace-db", path, "--baseline", "aaa", "--candidate", "bbb",
                 "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["samples"] == {"baseline": 150, "candidate": 150,
                                            "shadow_comparisons": 0}


def test_example_rules_parse_and_unknown_keys_are_rejected():
    rules = load_rules(EXAMPLES / "gate.yaml")
    assert rules.min_samples == 100 and rules.thresholds["e2e_p95_ratio"].hold is None
    with pytest.raises(ValueError, match="unknown key"):
        parse_rules({"min_sample": 3})
    with pytest.raises(ValueError, match="non-negative"):
        parse_rules({"rules": {"error_rate": {"hold": -1}}})


def test_rollback_needs_min_samples_and_ks_statistic_bounds():
    bad = [TraceSample(status="error", owner="o", model_version="m", prompt_version="p")] * 5
    good = [TraceSample(ttft=0.1, completion_tokens=10)] * 60
    assert decide(good, bad, rules=GateRules(min_samples_rollback=20)).action == "hold"
    assert decide(good, bad, rules=GateRules(min_samples_rollback=5)).action == "rollback"
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([1, 2], [5, 6]) == 1.0
