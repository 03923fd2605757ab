"""The embedded default model: served when no model is given, built locally, never downloaded.

It is a small Llama-architecture checkpoint with the real cl100k_base tokenizer and **random
weights**: it exercises every part of the engine (tokenizer, chat template, KV cache, sampling,
streaming) but its text is gibberish.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from llmserve.models.random_checkpoint import build_random_checkpoint

DEFAULT_MODEL_NAME = "llmserve-default"
# Bump the version whenever the recipe below changes, so old caches are not reused.
DEFAULT_MODEL_VERSION = "default-model-v1"
_MARKER = "llmserve_default_model.json"
_RECIPE = dict(
    architecture="llama",
    seed=0,
    tokenizer="cl100k",
    dtype="float32",
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Where the default model lives: ``<cache>/default-model-v1``.

    ``<cache>`` is ``cache_dir``, else ``$LLMSERVE_CACHE``, else ``~/.cache/llmserve``.
    """
    base = cache_dir or os.environ.get("LLMSERVE_CACHE") or pathlib.Path.home() / ".cache/llmserve"
    return pathlib.Path(base).expanduser() / DEFAULT_MODEL_VERSION


def _is_complete(path: pathlib.Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("version") == DEFAULT_MODEL_VERSION


def ensure_default_model(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Return the directory of the default model, building it first if it is not cached.

    The build goes to a temporary directory next to the target and is renamed into place, so a
    reader never sees a half-written model and two processes starting at once both end up with
    the same complete directory (the loser of the rename race discards its copy).
    """
    target = default_model_dir(cache_dir)
    if _is_complete(target):
        return str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_VERSION}-",
                                            dir=target.parent))
    except OSError as exc:
        raise RuntimeError(f"cannot write the default model under {target.parent} ({exc}); "
                           "set LLMSERVE_CACHE to a writable directory") from exc
    try:
        build_random_checkpoint(tmp, **_RECIPE)
        marker = {"version": DEFAULT_MODEL_VERSION, "name": DEFAULT_MODEL_NAME,
                  "recipe": _RECIPE, "weights": "random"}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(target):
        raise RuntimeError(f"could not build the default model in {target}")
    return str(target)


def _move_into_place(tmp: pathlib.Path, target: pathlib.Path) -> None:
    """Rename ``tmp`` to ``target``; a complete target from another process wins."""
    if target.exists() and not _is_complete(target):
        # Left over from something other than this function (renames are atomic): set aside.
        stale = pathlib.Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
        try:
            os.replace(target, stale / "old")
        except OSError:
            pass  # someone else moved it first
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target):  # not a lost race: a real failure
            raise
