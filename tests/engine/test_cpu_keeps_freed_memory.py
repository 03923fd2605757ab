"""A CPU engine asks glibc to keep freed memory once its weights and KV pool are in place."""

from __future__ import annotations

from llmserve.engine import model_runner
from llmserve.engine.llm_engine import LLMEngine


def test_a_cpu_engine_keeps_freed_memory_after_loading(llama_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(model_runner, "keep_freed_memory", lambda: calls.append("kept") or True)
    engine = LLMEngine.from_args(llama_dir, dtype="float32", device="cpu", num_kv_blocks=32)
    assert calls == ["kept"]
    assert engine.runner.kv_cache.numel()  # called after the KV pool was allocated
