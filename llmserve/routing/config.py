"""Router configuration: public model names -> deployments (versions with an owner) -> replicas.

A YAML file (see ``examples/router.yaml``) is parsed into frozen dataclasses. Unknown keys, bad
types and dangling references raise ``ValueError`` naming the offending path, so a typo never
silently changes routing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmserve.observability.pricing import ListPrice, parse_model_price
from llmserve.routing.gate import GateRules
from llmserve.routing.gate_rules import load_rules, parse_rules

POLICIES = ("round_robin", "least_outstanding", "prefix_affinity", "session")


@dataclass(frozen=True)
class Replica:
    """One OpenAI-compatible endpoint (base URL without ``/v1``)."""

    url: str
    api_key: str | None = None


@dataclass(frozen=True)
class Deployment:
    """A version of a model: who owns it and where it runs."""

    name: str
    owner: str | None
    replicas: tuple[Replica, ...]
    model_version: str | None = None  # used when the backend does not report one
    backend_model: str | None = None  # rewrite the request's "model" to this name upstream
    pricing: ListPrice | None = None


@dataclass(frozen=True)
class ShadowConfig:
    deployment: str
    percent: float
    queue_size: int = 64
    concurrency: int = 2


@dataclass(frozen=True)
class WatchdogConfig:
    """Live canary check: the gate rules over a sliding window of the router's own requests."""

    rules: GateRules
    window_s: float = 60.0
    interval_s: float = 2.0
    enabled: bool = True


@dataclass(frozen=True)
class ModelRoute:
    """How one public model name is served."""

    name: str
    deployments: dict[str, Deployment]
    primary: str
    policy: str = "least_outstanding"
    prefix_chars: int = 256
    canary: str | None = None
    canary_weight: float = 0.0  # percent of users
    shadow: ShadowConfig | None = None
    watchdog: WatchdogConfig | None = None


@dataclass(frozen=True)
class HealthConfig:
    path: str = "/health"
    interval_s: float = 2.0
    timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 2


@dataclass(frozen=True)
class RouterConfig:
    """The whole router file, validated."""

    models: dict[str, ModelRoute]
    host: str = "127.0.0.1"
    port: int = 8080
    admin_token: str | None = None
    trace_db: str | None = None
    events_file: str | None = None
    health: HealthConfig = field(default_factory=HealthConfig)
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    max_attempts: int = 3
    source: str = "<dict>"

    def replica_urls(self) -> set[str]:
        return {r.url for m in self.models.values() for d in m.deployments.values() for r in d.replicas}


class _Section:
    """A dict being validated: typed getters, and a check that no unknown key is left."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        self.data, self.where, self.seen = data, where, set()

    def get(self, key: str, kind: type | tuple, default: Any = None, required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise ValueError(f"{self.where}: missing required key {key!r}")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise ValueError(f"{self.where}.{key}: expected {names}, got {value!r}")
        return value

    def number(self, key: str, default: float, low: float = 0.0, high: float | None = None,
               strict: bool = False) -> float:
        value = float(self.get(key, (int, float), default))
        if value < low or (strict and value == low) or (high is not None and value > high):
            bound = f"> {low}" if strict else f">= {low}"
            bound += f" and <= {high}" if high is not None else ""
            raise ValueError(f"{self.where}.{key}: must be {bound}, got {value}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ValueError(f"{self.where}: unknown key(s) {', '.join(map(str, unknown))}")


def _secret(sec: _Section, key: str) -> str | None:
    """A secret given inline (``key``) or through an environment variable (``key_env``)."""
    value = sec.get(key, str)
    env = sec.get(f"{key}_env", str)
    if value and env:
        raise ValueError(f"{sec.where}: give {key} or {key}_env, not both")
    if env:
        if env not in os.environ:
            raise ValueError(f"{sec.where}.{key}_env: environment variable {env} is not set")
        return os.environ[env]
    return value


def normalize_url(url: str, where: str) -> str:
    """Strip a trailing slash and ``/v1`` so paths like ``/v1/chat/completions`` append cleanly."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{where}: replica url must start with http:// or https://, got {url!r}")
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _replica(data: Any, where: str) -> Replica:
    if isinstance(data, str):
        data = {"url": data}
    sec = _Section(data, where)
    url = normalize_url(sec.get("url", str, required=True), f"{where}.url")
    replica = Replica(url=url, api_key=_secret(sec, "api_key"))
    sec.done()
    return replica


def _deployment(name: str, data: Any, where: str) -> Deployment:
    sec = _Section(data, where)
    replicas = sec.get("replicas", list, required=True)
    if not replicas:
        raise ValueError(f"{where}.replicas: a deployment needs at least one replica")
    pricing = sec.get("pricing", dict)
    price = parse_model_price(dict(pricing, mode="list"), f"{where}.pricing") if pricing else None
    dep = Deployment(
        name=name,
        owner=sec.get("owner", str),
        replicas=tuple(_replica(r, f"{where}.replicas[{i}]") for i, r in enumerate(replicas)),
        model_version=sec.get("model_version", str),
        backend_model=sec.get("backend_model", str),
        pricing=price,  # type: ignore[arg-type]
    )
    sec.done()
    return dep


def _watchdog(data: Any, where: str, base_dir: Path) -> WatchdogConfig:
    sec = _Section(data, where)
    rules = sec.get("rules", (str, dict))
    if isinstance(rules, str):
        gate_rules = load_rules(base_dir / rules)
    else:
        gate_rules = parse_rules(rules or {}, f"{where}.rules")
    wd = WatchdogConfig(
        rules=gate_rules,
        window_s=sec.number("window_s", 60.0, strict=True),
        interval_s=sec.number("interval_s", 2.0, strict=True),
        enabled=sec.get("enabled", bool, True),
    )
    sec.done()
    return wd


def _model(name: str, data: Any, where: str, base_dir: Path) -> ModelRoute:
    sec = _Section(data, where)
    deps_raw = _Section(sec.get("deployments", dict, required=True), f"{where}.deployments")
    deployments = {str(k): _deployment(str(k), v, f"{deps_raw.where}.{k}") for k, v in deps_raw.data.items()}
    if not deployments:
        raise ValueError(f"{where}.deployments: at least one deployment is needed")

    def ref(value: str, key: str) -> str:
        if value not in deployments:
            raise ValueError(f"{where}.{key}: unknown deployment {value!r}; "
                             f"known: {', '.join(sorted(deployments))}")
        return value

    primary = ref(sec.get("primary", str, required=True), "primary")
    policy = sec.get("policy", str, "least_outstanding")
    if policy not in POLICIES:
        raise ValueError(f"{where}.policy: must be one of {', '.join(POLICIES)}, got {policy!r}")
    canary, weight = None, 0.0
    if "canary" in sec.data and sec.data["canary"] is not None:
        csec = _Section(sec.get("canary", dict), f"{where}.canary")
        canary = ref(csec.get("deployment", str, required=True), "canary.deployment")
        weight = csec.number("weight", 0.0, high=100.0)
        csec.done()
        if canary == primary:
            raise ValueError(f"{where}.canary: the canary must differ from the primary {primary!r}")
    shadow = None
    if sec.data.get("shadow") is not None:
        ssec = _Section(sec.get("shadow", dict), f"{where}.shadow")
        shadow = ShadowConfig(
            deployment=ref(ssec.get("deployment", str, required=True), "shadow.deployment"),
            percent=ssec.number("percent", 100.0, high=100.0),
            queue_size=int(ssec.number("queue_size", 64, low=1)),
            concurrency=int(ssec.number("concurrency", 2, low=1)),
        )
        ssec.done()
    watchdog = None
    if sec.data.get("watchdog") is not None:
        watchdog = _watchdog(sec.get("watchdog", dict), f"{where}.watchdog", base_dir)
    route = ModelRoute(
        name=name, deployments=deployments, primary=primary, policy=policy,
        prefix_chars=int(sec.number("prefix_chars", 256, low=1)),
        canary=canary, canary_weight=weight, shadow=shadow, watchdog=watchdog,
    )
    sec.done()
    return route


def parse_config(data: Any, source: str = "<dict>", base_dir: str | Path = ".") -> RouterConfig:
    """Validate a parsed router document and build a RouterConfig."""
    sec = _Section(data, source)
    models_raw = _Section(sec.get("models", dict, required=True), f"{source}: models")
    base = Path(base_dir)
    models = {str(k): _model(str(k), v, f"{source}: models.{k}", base) for k, v in models_raw.data.items()}
    if not models:
        raise ValueError(f"{source}: 'models' is empty; configure at least one model")
    hsec = _Section(sec.get("health", dict, {}), f"{source}: health")
    health = HealthConfig(
        path=hsec.get("path", str, "/health"),
        interval_s=hsec.number("interval_s", 2.0, strict=True),
        timeout_s=hsec.number("timeout_s", 1.0, strict=True),
        unhealthy_threshold=int(hsec.number("unhealthy_threshold", 2, low=1)),
        healthy_threshold=int(hsec.number("healthy_threshold", 2, low=1)),
    )
    hsec.done()
    trace_db, events_file = sec.get("trace_db", str), sec.get("events_file", str)
    cfg = RouterConfig(
        models=models,
        host=sec.get("host", str, "127.0.0.1"),
        port=int(sec.number("port", 8080, low=0, high=65535)),
        admin_token=_secret(sec, "admin_token"),
        trace_db=str(base / trace_db) if trace_db else None,
        events_file=str(base / events_file) if events_file else None,
        health=health,
        connect_timeout_s=sec.number("connect_timeout_s", 2.0, strict=True),
        read_timeout_s=sec.number("read_timeout_s", 600.0, strict=True),
        max_attempts=int(sec.number("max_attempts", 3, low=1)),
        source=source,
    )
    sec.done()
    return cfg


def load_config(path: str | Path) -> RouterConfig:
    """Read and validate a router YAML file; relative paths inside resolve against its folder."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"router config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"router config {str(p)!r} is not valid YAML: {exc}") from None
    return parse_config(data, source=str(p), base_dir=p.parent)
