"""Frozen configuration dataclasses. `validate()` raises ValueError with a message a user can act on."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
ATTENTION_BACKENDS = ("auto", "torch", "triton")
STRUCTURED_OUTPUTS_BACKENDS = ("llguidance", "xgrammar")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a user-facing dtype name to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype!r}; use one of float32, float16, bfloat16"
        ) from None


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and how."""

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    device: str = "auto"

    @cached_property
    def hf_config(self) -> dict:
        path = Path(self.model) / "config.json"
        if not path.is_file():
            raise ValueError(f"no config.json in {self.model!r}: pass a Hugging Face model directory")
        return json.loads(path.read_text())

    @cached_property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @cached_property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return parse_dtype(self.dtype)
        if self.torch_device.type == "cpu":
            return torch.float32  # CPU matmuls in half precision are slow and lossy
        name = self.hf_config.get("torch_dtype") or self.hf_config.get("dtype") or "bfloat16"
        return parse_dtype(name) if name in _DTYPES else torch.bfloat16

    @cached_property
    def derived_max_model_len(self) -> int:
        cfg = self.hf_config.get("text_config", self.hf_config)
        # Sliding windows do not cap the context: windowed layers attend to their last
        # `sliding_window` positions at any length (llmserve.attention.windows).
        limit = int(cfg.get("max_position_embeddings", 2048))
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds what the model supports ({limit})"
            )
        return self.max_model_len

    def validate(self) -> None:
        if not Path(self.model).is_dir():
            raise ValueError(f"model directory {self.model!r} does not exist")
        self.hf_config  # noqa: B018 - raises for a missing config.json
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        from llmserve.models.registry import resolve_model_class

        resolve_model_class(self.hf_config)  # unknown architectures fail before any loading
        self.derived_max_model_len  # noqa: B018 - raises when max_model_len is too large


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV-cache shape. The pool is `num_kv_blocks` blocks, or sized from free memory."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    # Fraction of free device memory (after weights) given to the KV cache when num_kv_blocks is unset.
    memory_fraction: float = 0.9
    # On CPU the pool is also capped so that start-up does not zero tens of GB of RAM.
    cpu_kv_cache_gib: float = 2.0
    enable_prefix_caching: bool = True

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Token budget per step and the cap on concurrently running sequences."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, validated once at construction."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = "auto"
    enforce_eager: bool = False
    tokenizer: str | None = None
    # Ranks the model is split over (one process each); see llmserve.distributed.
    tensor_parallel_size: int = 1
    # Schedule and launch step N+1 before reading step N's tokens (None: on for CUDA at TP=1).
    async_scheduling: bool | None = None
    # Grammar backend for structured outputs: "llguidance" or "xgrammar" (an extra).
    structured_outputs_backend: str = "llguidance"

    @cached_property
    def max_model_len(self) -> int:
        return self.model.derived_max_model_len

    @cached_property
    def resolved_attention_backend(self) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.model.torch_device.type == "cuda" else "torch"

    @cached_property
    def resolved_async_scheduling(self) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        env = os.environ.get("LLMSERVE_ASYNC_SCHEDULING")  # lets a test run pin the default
        if env is not None and self.tensor_parallel_size == 1:
            return env == "1"
        return self.model.torch_device.type == "cuda" and self.tensor_parallel_size == 1

    def validate(self) -> None:
        self.model.validate()
        self.cache.validate()
        self.scheduler.validate()
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.attention_backend == "triton" and self.model.torch_device.type != "cuda":
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(
                    "attention_backend='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for testing)"
                )
        if self.structured_outputs_backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(
                f"structured_outputs_backend must be one of {STRUCTURED_OUTPUTS_BACKENDS}, got "
                f"{self.structured_outputs_backend!r}"
            )
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError(
                "async_scheduling needs tensor_parallel_size=1 (the other ranks need each step's "
                "input tokens on the host); leave it unset or turn it off"
            )
        from llmserve.distributed.parallel_state import check_tensor_parallel_size

        check_tensor_parallel_size(self.model.hf_config, self.tensor_parallel_size)
