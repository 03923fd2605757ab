"""Gate rules files: thresholds and minimum sample sizes, from YAML (see examples/gate.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmserve.routing.gate import RULES, SIZE_KEYS, GateRules, Threshold


def parse_rules(data: Any, source: str = "gate rules") -> GateRules:
    """Build GateRules from a parsed YAML mapping; omitted rules keep their defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SIZE_KEYS) - {"rules"})
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}")
    defaults = GateRules()
    sizes = {}
    for key in SIZE_KEYS:
        value = data.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{source}: {key} must be a non-negative integer, got {value!r}")
        sizes[key] = value
    thresholds = dict(defaults.thresholds)
    raw = data.get("rules") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: rules must be a mapping of rule name to thresholds")
    for name, spec in raw.items():
        if name not in RULES:
            raise ValueError(f"{source}: unknown rule {name!r}; known: {', '.join(RULES)}")
        thresholds[name] = _threshold(spec, f"{source}: rules.{name}")
    return GateRules(thresholds=thresholds, **sizes)


def _threshold(spec: Any, where: str) -> Threshold:
    if spec is None or spec is False:
        return Threshold(None, None)
    if not isinstance(spec, dict) or set(spec) - {"hold", "rollback"}:
        raise ValueError(f"{where}: expected {{hold: X, rollback: Y}} or null to disable")
    for key in ("hold", "rollback"):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise ValueError(f"{where}.{key}: expected a non-negative number or null, got {v!r}")
    hold, rollback = spec.get("hold"), spec.get("rollback")
    return Threshold(None if hold is None else float(hold),
                     None if rollback is None else float(rollback))


def load_rules(path: str | Path) -> GateRules:
    """Read gate rules from a YAML file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"gate rules file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"gate rules file {str(p)!r} is not valid YAML: {exc}") from None
    return parse_rules(data, str(p))
