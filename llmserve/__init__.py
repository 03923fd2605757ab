"""llmserve: an LLM serving engine for Hugging Face checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "AsyncEngine", "__version__"]

if TYPE_CHECKING:
    from llmserve.engine.async_engine import AsyncEngine
    from llmserve.llm import LLM


def __getattr__(name: str):
    # Lazy, so `import llmserve` stays cheap for the CLI and for tools that only need params.
    if name == "LLM":
        from llmserve.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from llmserve.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
