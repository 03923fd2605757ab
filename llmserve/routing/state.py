"""The router's shared state types: one public model in one config generation, and overrides.

The router owns these objects; the proxy, the shadow replay and the watchdog read them, and
only the router changes them (reloads swap whole generations, overrides change one model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmserve.routing.backends import ReplicaState
from llmserve.routing.config import Deployment, ModelRoute
from llmserve.routing.policies import Policy
from llmserve.routing.shadow import ShadowMirror


@dataclass(frozen=True)
class Override:
    """A runtime routing decision and the file routing it was made against."""

    file_routing: tuple[str, str | None, float]
    primary: str
    canary: str | None
    canary_weight: float


def file_routing(route: ModelRoute) -> tuple[str, str | None, float]:
    """(primary, canary, canary weight) as the config file routes ``route``."""
    return route.primary, route.canary, route.canary_weight


@dataclass
class ModelState:
    """One public model in one config generation."""

    route: ModelRoute
    primary: str
    canary: str | None
    canary_weight: float
    replicas: dict[str, list[ReplicaState]]
    policies: dict[str, Policy]
    overridden: bool = False
    mirror: ShadowMirror | None = field(default=None, repr=False)

    def deployment(self, name: str) -> Deployment:
        return self.route.deployments[name]

    def pool(self, deployment: str) -> tuple[Policy, list[ReplicaState]]:
        """The replica-picking policy and the replicas of ``deployment``."""
        return self.policies[deployment], self.replicas[deployment]

    def snapshot(self) -> dict[str, Any]:
        return {
            "primary": self.primary, "canary": self.canary, "canary_weight": self.canary_weight,
            "policy": self.route.policy, "overridden": self.overridden,
            "shadow": ({"deployment": self.route.shadow.deployment, **self.mirror.stats()}
                       if self.route.shadow and self.mirror else None),
            "deployments": {
                name: {"owner": dep.owner, "model_version": dep.model_version,
                       "replicas": [r.snapshot() for r in self.replicas[name]]}
                for name, dep in self.route.deployments.items()},
        }
