"""Fixtures for the trace-ledger tests (helpers live in ledger_server.py)."""

from ledger_server import tiny_checkpoint  # noqa: F401 - a session fixture
