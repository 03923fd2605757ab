"""Settings of the online Batch API and its `llmserve serve` option (no heavy imports)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BatchOptions:
    """Settings of the online Batch API.

    Attributes:
        root: directory for uploaded files, results and the SQLite state.
        served_model_names: names a line's `model` may use (default: the engine's name).
        max_concurrency: batch lines in the engine at once while no interactive request is in
            flight (default: the engine's max_num_seqs).
        busy_concurrency: the cap while interactive requests are in flight (default:
            max(1, max_num_seqs // 8)).
        max_file_bytes: largest accepted upload.
        poll_s: how often the worker re-checks the engine's load.
        counts_interval_s: how often `request_counts` are saved while a batch runs.
    """

    root: str | Path
    served_model_names: list[str] | None = None
    max_concurrency: int | None = None
    busy_concurrency: int | None = None
    max_file_bytes: int = 256 * 1024 * 1024
    poll_s: float = 0.02
    counts_interval_s: float = 1.0


def default_batch_dir() -> str:
    """`$LLMSERVE_BATCH_DIR`, else `$XDG_STATE_HOME/llmserve/batches` (~/.local/state)."""
    explicit = os.environ.get("LLMSERVE_BATCH_DIR")
    if explicit:
        return explicit
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "state")
    return os.path.join(state, "llmserve", "batches")


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    """`--batch-dir` for `llmserve serve`."""
    parser.add_argument_group("batch API").add_argument(
        "--batch-dir", default=None, metavar="DIR",
        help="serve /v1/files and /v1/batches, keeping files and batch state in DIR (default: "
             "$LLMSERVE_BATCH_DIR or ~/.local/state/llmserve/batches; 'off' disables them)")

