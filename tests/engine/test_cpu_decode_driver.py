"""The native decode driver (`llmserve.kernels.cpu_decode_forward`): all-decode steps of the fused
CPU forward in one C call, bit for bit the Python walk's hidden states, with the same errors and
a fall back to the walk wherever it does not apply."""

from __future__ import annotations

import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve.attention.backends import torch_attention
from llmserve.attention.metadata import get_attention_metadata
from llmserve.kernels import cpu_decode_forward, cpu_native, cpu_packed_gemm
from llmserve.kernels.cpu_decode_forward import DecodeForward
from llmserve.models import cpu_fast_path
from llmserve.models.cpu_fast_path import FusedCPUForward
from tests.engine.test_parity_transformers import make_prompts

pytestmark = pytest.mark.skipif(
    cpu_native.find_compiler() is None or not cpu_packed_gemm.available(),
    reason="needs a C compiler and torch with MKL")

ARCHS = {
    "qwen3": ("qwen3", {"head_dim": 32}),  # q/k norm
    "qwen2": ("qwen2", {}),  # q/k/v bias, a sliding window on layers 1-2
    "mistral": ("mistral", {}),  # a window on every layer, blocks released behind it
    "llama": ("llama", {}),
}
MAX_TOKENS = 8


@pytest.fixture(autouse=True)
def fresh_load():
    cpu_decode_forward.load.cache_clear()
    yield
    cpu_decode_forward.load.cache_clear()


def generate(llm: LLM, batch: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def fused(llm: LLM) -> FusedCPUForward:
    forward = llm.engine.runner.model.model.fused_forward
    assert isinstance(forward, FusedCPUForward)
    return forward


@pytest.fixture
def chunks():
    """(rows, chunk) of the steps the driver ran (filled by `driver_calls`)."""
    return []


@pytest.fixture
def driver_calls(monkeypatch, chunks):
    """Row counts of the steps the driver ran."""
    rows: list[int] = []
    call = DecodeForward.__call__

    def counting(self, input_ids, *args):
        rows.append(len(input_ids))
        chunks.append((len(input_ids), args[3] if len(args) > 3 else 0))
        return call(self, input_ids, *args)

    monkeypatch.setattr(DecodeForward, "__call__", counting)
    return rows


def compare_with_walk(monkeypatch, driver_calls: list, label: str) -> list[int]:
    """Make every forward that adds to `driver_calls` (a step the driver took part in) run again
    through the Python walk on the same inputs, and assert the same hidden states bit for bit
    (storing the same k and v twice changes nothing). Returns the row counts checked."""
    checked: list[int] = []
    call = FusedCPUForward.__call__

    def comparing(self, input_ids, positions):
        before = len(driver_calls)
        out = call(self, input_ids, positions)
        if len(driver_calls) > before:
            fns, self._driver_fns = self._driver_fns, None
            try:
                walked = call(self, input_ids, positions)
            finally:
                self._driver_fns = fns
            assert torch.equal(out, walked), (label, len(input_ids))
            checked.append(len(input_ids))
        return out

    monkeypatch.setattr(FusedCPUForward, "__call__", comparing)
    return checked


@pytest.mark.parametrize("packing", ["packed", "unpacked"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_driver_gives_the_python_walks_hidden_states_bit_for_bit(
        checkpoint_factory, monkeypatch, driver_calls, chunks, arch, packing):
    """Every step the driver takes is run again through the Python walk on the same inputs
    (storing the same k and v twice changes nothing): the hidden states are equal, at 1-3 rows
    (plain GEMV), at and above MKL's packed-copy threshold, from DECODE_CHUNK_MIN_ROWS rows in
    per-thread chunks, and without packed copies (op by op at every size)."""
    if packing == "unpacked":
        monkeypatch.setenv(cpu_packed_gemm.BUDGET_ENV, "0")
    checked = compare_with_walk(monkeypatch, driver_calls, arch)
    name, overrides = ARCHS[arch]
    llm = LLM(checkpoint_factory(name, **overrides), dtype="float32")
    assert fused(llm)._driver_fns is not None
    batch = make_prompts(vocab=400)
    for size in (1, 2, 3, 5, len(batch)):  # decode steps of each of these sizes
        generate(llm, batch[:size])
    assert {1, 2, 3, 5, len(batch)} <= set(checked)
    assert len(batch) >= cpu_fast_path.DECODE_CHUNK_MIN_ROWS
    for rows, chunk in chunks:
        chunked = packing == "packed" and rows >= cpu_fast_path.DECODE_CHUNK_MIN_ROWS
        assert (chunk > 0) == chunked, (rows, chunk)


def test_steps_the_driver_cannot_take_walk_the_layers(checkpoint_factory, monkeypatch, driver_calls):
    """Prefill steps, another attention backend, steps above MAX_ROWS rows and the switch all
    keep the Python walk, with the same tokens."""
    path = checkpoint_factory("qwen3", head_dim=32)
    batch = make_prompts(vocab=400)[:6]
    llm = LLM(path, dtype="float32")
    expected = generate(llm, batch)
    assert driver_calls and all(n <= len(batch) for n in driver_calls)

    driver_calls.clear()
    monkeypatch.setattr(cpu_packed_gemm, "MAX_ROWS", 2)
    assert generate(llm, batch) == expected  # 6 decode rows a step
    assert not driver_calls
    assert generate(llm, batch[:2]) == expected[:2]
    assert driver_calls and max(driver_calls) == 2
    monkeypatch.undo()

    def wrapped(*args):
        return torch_attention(*args)

    layers = llm.engine.runner.model.model.layers
    for layer in layers:
        layer.self_attn.attn.backend = wrapped
    driver_calls.clear()
    assert generate(llm, batch) == expected
    assert not driver_calls
    for layer in layers:
        layer.self_attn.attn.backend = torch_attention

    monkeypatch.setenv(cpu_decode_forward.ENV_SWITCH, "0")
    cpu_decode_forward.load.cache_clear()
    off = LLM(path, dtype="float32")
    assert fused(off)._driver_fns is None
    assert generate(off, batch) == expected
    assert not driver_calls


def test_a_reallocated_kv_cache_gets_a_new_driver(checkpoint_factory):
    llm = LLM(checkpoint_factory("qwen3", head_dim=32), dtype="float32")
    batch = make_prompts(vocab=400)[:4]
    expected = generate(llm, batch)
    forward = fused(llm)
    first = forward._driver
    assert first is not None and first.cache_ptr == forward.layers[0].attn.k_cache.data_ptr()
    for layer in forward.layers:  # what a runner that resizes its pool does: new tensors
        layer.attn.k_cache = layer.attn.k_cache.clone()
        layer.attn.v_cache = layer.attn.v_cache.clone()
    assert generate(llm, batch) == expected
    assert forward._driver is not first
    assert forward._driver.cache_ptr == forward.layers[0].attn.k_cache.data_ptr()


def test_bad_step_inputs_raise_index_errors_and_the_engine_goes_on(checkpoint_factory):
    """What the per-op walk refuses, the driver refuses with an IndexError: token ids outside
    the embedding, positions beyond the rotary cache, slots outside the KV cache, block ids
    outside it."""
    llm = LLM(checkpoint_factory("qwen3", head_dim=32), dtype="float32")
    batch = make_prompts(vocab=400)[:2]
    expected = generate(llm, batch)
    driver = fused(llm)._driver
    k_cache = fused(llm).layers[0].attn.k_cache
    num_blocks, block_size = k_cache.shape[:2]
    rotary = fused(llm).layers[0].cos_sin.shape[0]

    def step(ids=5, position=3, slot=3, block=0):
        tables = torch.tensor([[block]], dtype=torch.int32)
        batch_ = cpu_native.DecodeBatch.build(tables, torch.tensor([position + 1]), torch.tensor([0]))
        return driver(torch.tensor([ids]), torch.tensor([position]), torch.tensor([slot]), batch_)

    assert step().shape == (1, driver.hidden)
    with pytest.raises(IndexError, match="token id"):
        step(ids=driver.embed.shape[0])
    with pytest.raises(IndexError, match="token id"):
        step(ids=-1)
    with pytest.raises(IndexError, match="rotary"):
        step(position=rotary)
    with pytest.raises(IndexError, match="slot"):
        step(slot=num_blocks * block_size)
    with pytest.raises(IndexError, match="block table entry"):
        step(block=num_blocks)
    with pytest.raises(IndexError, match="sequence length"):
        step(position=block_size)  # a length of 17 does not fit a one-block table row
    assert generate(llm, batch) == expected


def test_the_metadata_of_a_driven_step_is_untouched(checkpoint_factory, monkeypatch):
    """The driver reads the step's metadata and writes nothing into it (no plans, no slots)."""
    seen = []
    call = FusedCPUForward.__call__

    def spying(self, input_ids, positions):
        out = call(self, input_ids, positions)
        meta = get_attention_metadata()
        if self._driver is not None and meta.num_decode_tokens == len(input_ids):
            seen.append(dict(meta.backend_cache))
        return out

    monkeypatch.setattr(FusedCPUForward, "__call__", spying)
    generate(LLM(checkpoint_factory("qwen3", head_dim=32), dtype="float32"), [[5, 6, 7]])
    assert seen and all(cache == {} for cache in seen)
