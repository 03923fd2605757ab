"""Release gate: promote / hold / rollback a candidate version from measured evidence.

The same :func:`decide` serves the offline ``llmserve gate`` command (samples read from the trace
ledger) and the router's live canary watchdog (samples from a sliding window of its own requests).

Each rule measures one number and compares it with two thresholds: crossing ``hold`` blocks a
promotion, crossing ``rollback`` asks for a rollback. Rules whose data is missing (no streaming
requests for TTFT, no prices for cost, no shadow comparisons) report ``n/a`` and do not vote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PROMOTE, HOLD, ROLLBACK = "promote", "hold", "rollback"
EXIT_CODES = {PROMOTE: 0, HOLD: 1, ROLLBACK: 2}

# name -> (direction, default hold, default rollback). "max": larger is worse; "min": smaller is.
RULES: dict[str, tuple[str, float | None, float | None]] = {
    "error_rate": ("max", 0.05, 0.20),
    "error_rate_delta": ("max", 0.01, 0.05),
    "ttft_p95_ratio": ("max", 1.25, 2.0),
    "tpot_p95_ratio": ("max", 1.25, 2.0),
    "e2e_p95_ratio": ("max", None, None),  # off by default: it mixes latency with output length
    "cost_per_token_ratio": ("max", 1.10, 1.50),
    "shadow_agreement": ("min", 0.90, 0.50),
    "length_drift": ("max", 0.20, 0.50),  # two-sample Kolmogorov-Smirnov statistic, 0..1
}
SIZE_KEYS = ("min_samples", "min_samples_rollback", "min_baseline_samples", "min_shadow_samples")


@dataclass(frozen=True)
class Threshold:
    hold: float | None
    rollback: float | None


@dataclass(frozen=True)
class GateRules:
    """Thresholds per rule plus the minimum sample sizes that make a verdict meaningful."""

    thresholds: dict[str, Threshold] = field(
        default_factory=lambda: {k: Threshold(h, r) for k, (_, h, r) in RULES.items()})
    min_samples: int = 100  # candidate requests needed to promote
    min_samples_rollback: int = 20  # candidate requests needed before any rollback verdict
    min_baseline_samples: int = 50
    min_shadow_samples: int = 20


@dataclass(frozen=True)
class TraceSample:
    """The fields of one trace row that the gate reads."""

    status: str = "ok"  # ok / error / aborted
    error_type: str | None = None
    ttft: float | None = None
    tpot: float | None = None
    e2e_latency: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    model_version: str | None = None
    prompt_version: str | None = None
    owner: str | None = None

    @property
    def is_error(self) -> bool:
        # Client mistakes (OpenAI's invalid_request_error) say nothing about the version.
        return self.status == "error" and not (self.error_type or "").startswith("invalid_request")


@dataclass(frozen=True)
class ComparisonSample:
    exact_match: bool
    token_agreement: float


@dataclass
class Evidence:
    metric: str
    baseline: float | None
    candidate: float | None
    value: float | None
    hold: float | None
    rollback: float | None
    verdict: str  # ok / hold / rollback / n/a
    note: str = ""


@dataclass
class Decision:
    """The gate's answer with everything needed to audit it."""

    action: str
    baseline: str
    candidate: str
    owner: str | None
    auditable: bool
    reasons: list[str]
    evidence: list[Evidence]
    samples: dict[str, int]
    audit: dict[str, int]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.action]

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action, "exit_code": self.exit_code, "owner": self.owner,
            "baseline": self.baseline, "candidate": self.candidate, "auditable": self.auditable,
            "audit": self.audit, "samples": self.samples, "reasons": self.reasons,
            "evidence": [{k: _finite(v) for k, v in vars(e).items()} for e in self.evidence],
        }


def _finite(value: Any) -> Any:
    """JSON has no infinity: a ratio against a zero baseline is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return value


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no data."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Largest gap between the two empirical CDFs (0 = same distribution, 1 = disjoint)."""
    if not a or not b:
        return None
    xs, ys = sorted(a), sorted(b)
    i = j = 0
    gap = 0.0
    while i < len(xs) and j < len(ys):
        x = min(xs[i], ys[j])
        while i < len(xs) and xs[i] == x:
            i += 1
        while j < len(ys) and ys[j] == x:
            j += 1
        gap = max(gap, abs(i / len(xs) - j / len(ys)))
    return gap


def _ratio(base: float | None, cand: float | None) -> float | None:
    if base is None or cand is None:
        return None
    if base <= 0:
        return 1.0 if cand <= 0 else math.inf
    return cand / base


def _summary(samples: Sequence[TraceSample]) -> dict[str, float | None]:
    ok = [s for s in samples if s.status == "ok"]
    n = len(samples)
    errors = sum(s.is_error for s in samples)
    priced = [s for s in ok if s.cost_usd is not None]
    tokens = sum(s.prompt_tokens + s.completion_tokens for s in priced)
    return {
        "error_rate": errors / n if n else None,
        "ttft_p95": percentile([s.ttft for s in ok if s.ttft is not None], 95),
        "tpot_p95": percentile([s.tpot for s in ok if s.tpot is not None], 95),
        "e2e_p95": percentile([s.e2e_latency for s in ok if s.e2e_latency is not None], 95),
        "cost_per_token": sum(s.cost_usd for s in priced) / tokens if tokens else None,  # type: ignore[misc]
    }


def _measure(base: Sequence[TraceSample], cand: Sequence[TraceSample],
             comparisons: Sequence[ComparisonSample], rules: GateRules) -> list[Evidence]:
    """One Evidence per enabled rule, without verdicts yet."""
    b, c = _summary(base), _summary(cand)
    base_ok = len(base) >= rules.min_baseline_samples
    agreement = (sum(x.token_agreement for x in comparisons) / len(comparisons)
                 if len(comparisons) >= rules.min_shadow_samples else None)
    lengths = ([s.completion_tokens for s in base if s.status == "ok"],
               [s.completion_tokens for s in cand if s.status == "ok"])
    rows = {
        "error_rate": (b["error_rate"], c["error_rate"], c["error_rate"]),
        "error_rate_delta": (b["error_rate"], c["error_rate"],
                             c["error_rate"] - b["error_rate"]  # type: ignore[operator]
                             if base_ok and c["error_rate"] is not None else None),
        "ttft_p95_ratio": (b["ttft_p95"], c["ttft_p95"], _ratio(b["ttft_p95"], c["ttft_p95"])),
        "tpot_p95_ratio": (b["tpot_p95"], c["tpot_p95"], _ratio(b["tpot_p95"], c["tpot_p95"])),
        "e2e_p95_ratio": (b["e2e_p95"], c["e2e_p95"], _ratio(b["e2e_p95"], c["e2e_p95"])),
        "cost_per_token_ratio": (b["cost_per_token"], c["cost_per_token"],
                                 _ratio(b["cost_per_token"], c["cost_per_token"])),
        "shadow_agreement": (None, agreement, agreement),
        "length_drift": (None, None, ks_statistic(*lengths)),
    }
    out = []
    for name, th in rules.thresholds.items():
        if th.hold is None and th.rollback is None:
            continue
        bv, cv, value = rows[name]
        needs_base = name not in ("error_rate", "shadow_agreement")
        if needs_base and not base_ok:
            value = None
        out.append(Evidence(name, bv, cv, value, th.hold, th.rollback, "n/a"))
    return out


def _judge(ev: Evidence, can_rollback: bool) -> None:
    if ev.value is None:
        ev.note = "no data"
        return
    worse = (lambda v, t: v > t) if RULES[ev.metric][0] == "max" else (lambda v, t: v < t)
    if ev.rollback is not None and worse(ev.value, ev.rollback):
        ev.verdict = ROLLBACK if can_rollback else HOLD
        if not can_rollback:
            ev.note = "too few samples to roll back"
    elif ev.hold is not None and worse(ev.value, ev.hold):
        ev.verdict = HOLD
    else:
        ev.verdict = "ok"


def _audit(cand: Sequence[TraceSample]) -> tuple[dict[str, int], str | None]:
    audit = {
        "missing_model_version": sum(not s.model_version for s in cand),
        "missing_prompt_version": sum(not s.prompt_version for s in cand),
        "missing_owner": sum(not s.owner for s in cand),
    }
    owners = sorted({s.owner for s in cand if s.owner})
    return audit, ", ".join(owners) or None


def decide(baseline: Sequence[TraceSample], candidate: Sequence[TraceSample],
           comparisons: Sequence[ComparisonSample] = (), rules: GateRules | None = None,
           baseline_name: str = "baseline", candidate_name: str = "candidate",
           owner: str | None = None) -> Decision:
    """Promote, hold or roll back ``candidate`` against ``baseline``.

    Any rule past its rollback threshold (with at least ``min_samples_rollback`` candidate
    requests) rolls back. Otherwise too few samples, a rule past its hold threshold, or a
    candidate that is not auditable (a trace without model version, prompt version or owner)
    holds. Only a clean, auditable, well-sampled candidate is promoted.
    """
    rules = rules or GateRules()
    can_rollback = len(candidate) >= rules.min_samples_rollback
    evidence = _measure(baseline, candidate, comparisons, rules)
    for ev in evidence:
        _judge(ev, can_rollback)
    audit, trace_owner = _audit(candidate)
    owner = owner or trace_owner
    auditable = bool(candidate) and not any(audit.values())
    reasons = [f"{e.metric} = {e.value:.4g} is past the rollback threshold {e.rollback}"
               for e in evidence if e.verdict == ROLLBACK]
    action = ROLLBACK if reasons else HOLD
    if not reasons:
        reasons += [f"{e.metric} = {e.value:.4g} is past the hold threshold {e.hold}"
                    for e in evidence if e.verdict == HOLD and e.value is not None]
        if len(candidate) < rules.min_samples:
            reasons.append(f"candidate has {len(candidate)} requests, needs {rules.min_samples}")
        if len(baseline) < rules.min_baseline_samples:
            reasons.append(f"baseline has {len(baseline)} requests, "
                           f"needs {rules.min_baseline_samples}")
        if not auditable:
            missing = [k.removeprefix("missing_") for k, v in audit.items() if v]
            reasons.append("candidate is not auditable: traces lack " + (", ".join(missing) or
                                                                          "any record"))
        if not reasons:
            action = PROMOTE
            reasons.append("every rule passed")
    return Decision(action, baseline_name, candidate_name, owner, auditable, reasons, evidence,
                    {"baseline": len(baseline), "candidate": len(candidate),
                     "shadow_comparisons": len(comparisons)}, audit)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def render_table(d: Decision) -> str:
    """A human-readable evidence table followed by the decision line."""
    head = ("metric", "baseline", "candidate", "value", "hold", "rollback", "verdict")
    rows = [head] + [(e.metric, _fmt(e.baseline), _fmt(e.candidate), _fmt(e.value), _fmt(e.hold),
                      _fmt(e.rollback), e.verdict + (f" ({e.note})" if e.note else ""))
                     for e in d.evidence]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"samples: baseline={d.samples['baseline']} candidate={d.samples['candidate']} "
                 f"shadow_comparisons={d.samples['shadow_comparisons']}; auditable: {d.auditable}")
    lines.append(f"decision: {d.action.upper()} {d.candidate} (baseline {d.baseline}); "
                 f"owner: {d.owner or 'UNKNOWN'}")
    lines += [f"  - {r}" for r in d.reasons]
    return "\n".join(lines)
