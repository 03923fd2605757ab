"""Fixtures of the router tests; the helpers themselves live in routing_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The helper modules sit next to the tests; make them importable however pytest was started.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def admin() -> dict[str, str]:
    """Headers carrying the admin token of routing_helpers.router_config."""
    return {"authorization": "Bearer secret"}
