"""Replica selection policies: which healthy replica of a deployment gets a request.

Every policy answers ``pick(replicas, key, exclude)`` with one replica that is healthy and not in
``exclude`` (the replicas already tried for this request), or None when there is none.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Sequence
from typing import Protocol

from llmserve.routing.backends import ReplicaState

VNODES = 64  # points per replica on the hash ring: enough to spread keys within a few percent


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _usable(replicas: Sequence[ReplicaState], exclude: set[str]) -> list[ReplicaState]:
    return [r for r in replicas if r.healthy and r.url not in exclude]


class Policy(Protocol):
    def pick(self, replicas: Sequence[ReplicaState], key: str | None,
             exclude: set[str]) -> ReplicaState | None: ...


class RoundRobin:
    """Each healthy replica in turn."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, replicas: Sequence[ReplicaState], key: str | None,
             exclude: set[str]) -> ReplicaState | None:
        usable = _usable(replicas, exclude)
        return usable[next(self._counter) % len(usable)] if usable else None


class LeastOutstanding:
    """Power of two choices: sample two replicas, take the one with fewer requests in flight.

    Nearly as good as scanning every replica for the least loaded one, without herding every
    router onto the same replica when their views are stale.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, replicas: Sequence[ReplicaState], key: str | None,
             exclude: set[str]) -> ReplicaState | None:
        usable = _usable(replicas, exclude)
        if len(usable) <= 1:
            return usable[0] if usable else None
        a, b = self._rng.sample(usable, 2)
        return a if a.outstanding <= b.outstanding else b


class HashRing:
    """Consistent hashing: removing one replica only moves the keys that lived on it."""

    def __init__(self, urls: Sequence[str], vnodes: int = VNODES) -> None:
        points = sorted((stable_hash(f"{url}#{i}"), url) for url in urls for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._urls = [u for _, u in points]

    def walk(self, key: str):
        """Replica URLs in ring order starting at ``key``'s position (each URL once)."""
        if not self._hashes:
            return
        start = bisect.bisect(self._hashes, stable_hash(key))
        seen: set[str] = set()
        n = len(self._urls)
        for i in range(n):
            url = self._urls[(start + i) % n]
            if url not in seen:
                seen.add(url)
                yield url


class _RingPolicy:
    """Shared by prefix affinity and session: ring lookup, fall back to P2C without a key."""

    def __init__(self) -> None:
        self._ring: HashRing | None = None
        self._ring_urls: tuple[str, ...] = ()
        self._fallback = LeastOutstanding()

    def pick(self, replicas: Sequence[ReplicaState], key: str | None,
             exclude: set[str]) -> ReplicaState | None:
        if not key:
            return self._fallback.pick(replicas, None, exclude)
        urls = tuple(r.url for r in replicas)
        if urls != self._ring_urls:  # the replica set changed (reload): rebuild once
            self._ring, self._ring_urls = HashRing(urls), urls
        by_url = {r.url: r for r in replicas}
        assert self._ring is not None
        for url in self._ring.walk(key):
            r = by_url[url]
            if r.healthy and url not in exclude:
                return r
        return None


class PrefixAffinity(_RingPolicy):
    """Requests sharing their first ``prefix_chars`` characters go to the same replica, so that
    replica's prefix cache serves them."""


class Session(_RingPolicy):
    """Requests with the same ``user`` go to the same replica."""


def make_policy(name: str) -> Policy:
    """Build a policy by its config name."""
    policies = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding,
                "prefix_affinity": PrefixAffinity, "session": Session}
    if name not in policies:
        raise ValueError(f"unknown routing policy {name!r}; use one of {', '.join(policies)}")
    return policies[name]()


def routing_key(policy: str, body: dict, prefix_chars: int) -> str | None:
    """The text a hashing policy keys on: the prompt's first characters, or the user."""
    if policy == "session":
        user = body.get("user")
        return str(user) if user else None
    if policy != "prefix_affinity":
        return None
    return prompt_text(body, prefix_chars) or None


def prompt_text(body: dict, limit: int) -> str:
    """The first ``limit`` characters of a chat conversation or completion prompt."""
    prompt = body.get("prompt")
    if prompt is not None:
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else ""
        return (prompt if isinstance(prompt, str) else str(prompt))[:limit]
    parts: list[str] = []
    size = 0
    for msg in body.get("messages") or ():
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if isinstance(content, list):  # list-of-parts content: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        piece = f"{msg.get('role', '')}\n{content or ''}\n"
        parts.append(piece)
        size += len(piece)
        if size >= limit:
            break
    return "".join(parts)[:limit]
