"""The router's state: one generation per config, runtime decisions, and the services around it.

A config generation is a dict of :class:`ModelState` built from the file. A reload builds a new
generation and swaps one reference: requests already in flight keep the generation they started
with (and replica state is shared by URL), so nothing is dropped. Promotions, rollbacks and
weight changes are runtime overrides that survive reloads as long as the file still routes that
model the way it did when the override was made; once the file's routing changes, the file wins.

The router is the one owner of this state (its types live in ``state.py``). The parts around it
(upstream, watchdog, shadow replay, health monitor) receive callables, never the router; every
finished request, client or shadow, is settled by one ``Accounts``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from llmserve.routing.accounting import Accounts
from llmserve.routing.backends import ReplicaRegistry, ReplicaState
from llmserve.routing.config import ModelRoute, RouterConfig, load_config
from llmserve.routing.events import EventLog
from llmserve.routing.health import HealthMonitor
from llmserve.routing.policies import make_policy
from llmserve.routing.records import RouterRecorder
from llmserve.routing.shadow import ShadowMirror
from llmserve.routing.shadow_replay import ShadowReplay
from llmserve.routing.state import ModelState, Override, file_routing
from llmserve.routing.upstream import Upstream
from llmserve.routing.watchdog import CanaryWatchdog, SampleWindow

log = logging.getLogger("llmserve.router")


class Router:
    """Long-lived router core; the HTTP app and the admin endpoints call into it."""

    def __init__(self, config: RouterConfig, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.registry = ReplicaRegistry()
        self.recorder = RouterRecorder(config.trace_db)
        self.events = EventLog(self.recorder.event, config.events_file)
        self.window = SampleWindow()
        self.accounts = Accounts(self.recorder, self.window)
        self.overrides: dict[str, Override] = {}
        self._mirrors: dict[str, ShadowMirror] = {}
        self.client = httpx.AsyncClient(
            # Idle connections expire before uvicorn's 5 s keep-alive closes them on the replica's
            # side, so a reused connection is rarely one the replica is closing.
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=512,
                                keepalive_expiry=4.0),
            timeout=self.timeout, trust_env=False)
        self.health = HealthMonitor(self.client, self.registry.all, config.health,
                                    self._replica_changed)
        # The parts below get callables, never the router: they see reloads at once and
        # cannot reach the router's other state.
        self.upstream = Upstream(self.client, lambda: self.timeout,
                                 lambda: self.config.max_attempts, self.health.failure)
        self.watchdog = CanaryWatchdog(self.window, lambda: self.models, self.rollback,
                                       self._watchdog_failed)
        self.shadow_replay = ShadowReplay(lambda: self.models, self.upstream, self.accounts,
                                          self.recorder.comparison)
        self.models: dict[str, ModelState] = self._build(config)

    @property
    def timeout(self) -> httpx.Timeout:
        c = self.config
        return httpx.Timeout(c.read_timeout_s, connect=c.connect_timeout_s)

    # --- lifecycle ---

    async def start(self) -> None:
        self.health.start()
        self.watchdog.start()

    async def stop(self) -> None:
        await self.watchdog.stop()
        await self.health.stop()
        for mirror in list(self._mirrors.values()):
            await mirror.close()
        await self.client.aclose()
        await asyncio.to_thread(self.recorder.close)

    # --- building generations ---

    def _build(self, config: RouterConfig) -> dict[str, ModelState]:
        models = {}
        for name, route in config.models.items():
            primary, canary, weight = file_routing(route)
            override = self.overrides.get(name)
            overridden = False
            if override is not None:
                usable = override.primary in route.deployments and (
                    override.canary is None or override.canary in route.deployments)
                if override.file_routing == file_routing(route) and usable:
                    primary, canary, weight = override.primary, override.canary, override.canary_weight
                    overridden = True
                else:
                    del self.overrides[name]
                    self.events.record("override_cleared", model=name, actor="reload",
                                       reason="the config file changed this model's routing")
            for dep in route.deployments.values():
                if not dep.owner:
                    log.warning("deployment %s of model %s has no owner: the gate will not "
                                "promote it and events cannot name who is responsible",
                                dep.name, name)
            replicas = {d: [self.registry.get(r.url, r.api_key) for r in dep.replicas]
                        for d, dep in route.deployments.items()}
            state = ModelState(route, primary, canary, weight, replicas,
                               {d: make_policy(route.policy) for d in route.deployments},
                               overridden=overridden)
            state.mirror = self._mirror(name, route)
            models[name] = state
        return models

    def _mirror(self, name: str, route: ModelRoute) -> ShadowMirror | None:
        old = self._mirrors.get(name)
        cfg = route.shadow
        if cfg is None:
            if old is not None:
                self._retire(self._mirrors.pop(name))
            return None
        if old is not None and (old.queue_size, old.concurrency) == (cfg.queue_size, cfg.concurrency):
            old.percent = cfg.percent
            return old
        if old is not None:
            self._retire(old)
        mirror = ShadowMirror(self.shadow_replay, cfg.percent, cfg.queue_size, cfg.concurrency)
        self._mirrors[name] = mirror
        return mirror

    def _retire(self, mirror: ShadowMirror) -> None:
        try:
            asyncio.get_running_loop().create_task(mirror.close())
        except RuntimeError:  # no loop yet: nothing was ever queued
            pass

    def reload(self, config: RouterConfig | None = None, actor: str = "admin") -> dict[str, Any]:
        """Swap in a new config (re-read from the file when none is given)."""
        if config is None:
            if not self.config_path:
                raise ValueError("this router was not started from a config file; nothing to reload")
            config = load_config(self.config_path)
        models = self._build(config)
        fixed = [k for k in ("host", "port", "trace_db", "events_file")
                 if getattr(config, k) != getattr(self.config, k)]
        if fixed:  # these are bound at start-up: say so instead of pretending they changed
            log.warning("config reload ignores changes to %s; restart the router to apply them",
                        ", ".join(fixed))
        self.config = config
        self.health.config = config.health
        self.models = models  # the single swap: new requests see the new generation
        self.registry.retain(config.replica_urls())
        self.events.record("reload", actor=actor, reason=f"loaded {config.source}",
                           models=sorted(models))
        return self.status()

    # --- runtime decisions ---

    def _model(self, model: str) -> ModelState:
        state = self.models.get(model)
        if state is None:
            raise ValueError(f"unknown model {model!r}; configured: {', '.join(sorted(self.models))}")
        return state

    def _set(self, model: str, state: ModelState, primary: str, canary: str | None,
             weight: float) -> None:
        state.primary, state.canary, state.canary_weight = primary, canary, weight
        state.overridden = True
        self.overrides[model] = Override(file_routing(state.route), primary, canary, weight)

    def promote(self, model: str, deployment: str | None = None, actor: str = "admin",
                reason: str = "") -> dict[str, Any]:
        """Make ``deployment`` (default: the canary) the primary; the canary slot empties."""
        state = self._model(model)
        target = deployment or state.canary
        if target is None:
            raise ValueError(f"model {model!r} has no canary to promote; name a deployment")
        if target not in state.route.deployments:
            raise ValueError(f"model {model!r} has no deployment {target!r}")
        if target == state.primary:
            raise ValueError(f"{target!r} is already the primary of {model!r}")
        owner = state.deployment(target).owner
        if not owner:
            raise ValueError(f"deployment {target!r} has no owner: it is not auditable and "
                             "cannot be promoted; set its owner in the config")
        previous = state.primary
        self._set(model, state, target, None, 0.0)
        self.window.clear(model, target)
        return self.events.record("promote", model=model, deployment=target, owner=owner,
                                  actor=actor, reason=reason or "promoted", previous_primary=previous)

    def rollback(self, model: str, reason: str = "", actor: str = "admin",
                 evidence: dict | None = None) -> dict[str, Any]:
        """Send no more traffic to the canary (weight 0); it stays configured."""
        state = self._model(model)
        if state.canary is None:
            raise ValueError(f"model {model!r} has no canary to roll back")
        previous = state.canary_weight
        self._set(model, state, state.primary, state.canary, 0.0)
        return self.events.record("rollback", model=model, deployment=state.canary,
                                  owner=state.deployment(state.canary).owner, actor=actor,
                                  reason=reason or "rolled back", previous_weight=previous,
                                  evidence=evidence)

    def set_weight(self, model: str, weight: float, actor: str = "admin",
                   reason: str = "") -> dict[str, Any]:
        """Change the canary's share of users (percent)."""
        state = self._model(model)
        if state.canary is None:
            raise ValueError(f"model {model!r} has no canary deployment")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 100:
            raise ValueError(f"weight must be a number from 0 to 100, got {weight!r}")
        previous = state.canary_weight
        self._set(model, state, state.primary, state.canary, float(weight))
        if previous == 0:  # a fresh start: do not judge it on the failures that stopped it
            self.window.clear(model, state.canary)
        return self.events.record("weight", model=model, deployment=state.canary,
                                  owner=state.deployment(state.canary).owner, actor=actor,
                                  reason=reason or f"weight {previous:g} -> {weight:g}",
                                  previous_weight=previous, weight=float(weight))

    def _watchdog_failed(self, exc: Exception) -> None:
        self.events.record("watchdog_error", reason=repr(exc))

    def _replica_changed(self, replica: ReplicaState, kind: str) -> None:
        self.events.record(kind, actor="health", reason=replica.last_error or "healthy again",
                           url=replica.url)

    def status(self) -> dict[str, Any]:
        return {
            "config": self.config.source,
            "models": {name: s.snapshot() for name, s in self.models.items()},
            "watchdog": {m: {"action": d.action, "reasons": d.reasons}
                         for m, d in self.watchdog.last_decisions.items()},
            "dropped_trace_rows": self.recorder.dropped_rows,
        }
