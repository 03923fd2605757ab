"""Canary cohorts: which deployment of a model a request goes to.

A user's cohort comes from a hash of (model, canary deployment, user) into 10,000 buckets; the
canary takes the buckets below ``weight * 100``. So a user stays in one cohort for the life of a
canary, raising the weight only adds users (nobody flips back), and a new canary draws a fresh
cohort instead of burdening the same users every time. Requests without a ``user`` are assigned
at random, one by one. The ``X-Llmserve-Version`` header pins a deployment (for testing).
"""

from __future__ import annotations

import random

from llmserve.routing.policies import stable_hash

PIN_HEADER = "x-llmserve-version"
BUCKETS = 10_000
PRIMARY, CANARY, SHADOW = "primary", "canary", "shadow"


def cohort_bucket(model: str, canary: str, user: str) -> int:
    """The user's bucket in 0..BUCKETS-1 for this model's current canary."""
    return stable_hash(f"{model}\0{canary}\0{user}") % BUCKETS


def in_canary(model: str, canary: str | None, weight: float, user: str | None,
              rng: random.Random | None = None) -> bool:
    """Whether this request belongs to the canary cohort (weight is a percent)."""
    if canary is None or weight <= 0:
        return False
    if weight >= 100:
        return True
    threshold = round(weight * BUCKETS / 100)
    if user:
        return cohort_bucket(model, canary, user) < threshold
    return (rng or random).random() * BUCKETS < threshold


def assign(model: str, primary: str, canary: str | None, weight: float, user: str | None,
           pinned: str | None, deployments: set[str] | dict) -> tuple[str, str]:
    """``(deployment, route)`` for one request; route is "primary" or "canary".

    Raises:
        ValueError: the pin header names a deployment this model does not have.
    """
    if pinned:
        if pinned not in deployments:
            raise ValueError(f"{PIN_HEADER} names unknown deployment {pinned!r} of model "
                             f"{model!r}; known: {', '.join(sorted(deployments))}")
        return pinned, PRIMARY if pinned == primary else CANARY
    if in_canary(model, canary, weight, user):
        return canary, CANARY  # type: ignore[return-value]
    return primary, PRIMARY
