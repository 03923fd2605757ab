"""A CPU engine keeps its KV cache and weights on huge pages (`cpu_huge_pages`)."""

from __future__ import annotations

from llmserve import LLM
from llmserve.kernels import cpu_huge_pages
from llmserve.kernels.cpu_huge_pages import HUGE_PAGE
from tests.kernels.test_cpu_huge_pages import huge_bytes, needs_thp


@needs_thp
def test_the_engine_puts_its_kv_cache_and_weights_on_huge_pages(checkpoint_factory, monkeypatch):
    advised = []
    real = cpu_huge_pages.advise

    def spy(tensors, collapse=True):
        tensors = list(tensors)
        advised.extend(t.data_ptr() for t in tensors)
        return real(tensors, collapse)

    monkeypatch.setattr(cpu_huge_pages, "advise", spy)
    llm = LLM(checkpoint_factory("qwen3", head_dim=32), dtype="float32", num_kv_blocks=512,
              block_size=16)
    runner = llm.engine.runner
    kv = runner.kv_cache
    assert kv.numel() * 4 >= 4 * HUGE_PAGE
    assert huge_bytes(kv.data_ptr() + kv.numel() * 2) >= HUGE_PAGE  # its middle
    model = runner.model
    weights = [model.lm_head.weight, model.model.embed_tokens.weight,
               model.model.layers[0].mlp.gate_up_proj.weight]
    assert all(w.data_ptr() in advised for w in weights)
    greedy = model.lm_head.greedy
    if greedy is not None:
        assert greedy.wnorm.data_ptr() in advised
        if greedy.weight_bf16 is not None:  # the plain copy, where oneDNN could not prepack
            assert greedy.weight_bf16.data_ptr() in advised
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], use_tqdm=False)
    assert out[0].outputs[0].token_ids
