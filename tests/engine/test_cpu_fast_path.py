"""The fused CPU forward (`llmserve.models.cpu_fast_path`): token-exact against transformers in
fp32, switchable back to eager, and off where it does not apply (fp16/bf16)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmserve import LLM, SamplingParams
from llmserve.kernels import cpu_native, cpu_packed_gemm
from llmserve.models import cpu_fast_path
from llmserve.models.cpu_fast_path import ENV_SWITCH, FusedCPUForward, optimize_for_cpu
from tests.engine.parity import assert_matches, hf_greedy
from tests.engine.test_parity_transformers import make_prompts

pytestmark = pytest.mark.skipif(cpu_native.find_compiler() is None, reason="no C compiler")

MAX_TOKENS = 10
ARCHS = {
    "qwen3": ("qwen3", {"head_dim": 32}),  # q/k norm
    "qwen2": ("qwen2", {}),  # q/k/v bias
    "llama-tied-rope-llama3": ("llama", {
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }),
}


def prompts(vocab: int) -> list[list[int]]:
    """The prompts of test_parity_transformers: 18 of 1..190 tokens, half sharing a 40-token
    prefix (enough, with 24 blocks of 16, to force preemptions)."""
    return make_prompts(vocab)


@pytest.fixture(scope="module", params=list(ARCHS))
def reference(request, checkpoint_factory):
    arch, overrides = ARCHS[request.param]
    path = checkpoint_factory(arch, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = prompts(vocab=400)
    return path, batch, [hf_greedy(model, p, MAX_TOKENS) for p in batch]


def fast_llm(path: str, **engine_args) -> LLM:
    llm = LLM(path, dtype="float32", **engine_args)
    assert optimize_for_cpu(llm.engine.runner.model)
    assert isinstance(llm.engine.runner.model.model.fused_forward, FusedCPUForward)
    return llm


def generate(llm: LLM, batch: list[list[int]]):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    return llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)


def test_fused_forward_greedy_matches_transformers(reference):
    path, batch, expected = reference
    assert_matches(generate(fast_llm(path), batch), expected)


def test_fused_forward_with_preemption_and_chunked_prefill_matches_transformers(reference):
    path, batch, expected = reference
    llm = fast_llm(path, num_kv_blocks=24, block_size=16)
    assert_matches(generate(llm, batch), expected)
    assert llm.stats()["num_preemptions"] > 0
    assert llm.stats()["kv_blocks_free"] == 24
    chunked = fast_llm(path, max_num_batched_tokens=24, enable_prefix_caching=False)
    assert_matches(generate(chunked, batch), expected)


def test_eager_switch_and_env_var_restore_the_per_op_forward(checkpoint_factory, monkeypatch):
    llm = fast_llm(checkpoint_factory("qwen3", head_dim=32))
    model = llm.engine.runner.model
    assert not optimize_for_cpu(model, eager=True)
    assert model.model.fused_forward is None
    assert optimize_for_cpu(model)
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert not optimize_for_cpu(model)
    assert model.model.fused_forward is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_eager_and_generates(checkpoint_factory, dtype):
    llm = LLM(checkpoint_factory("qwen3", head_dim=32), dtype=dtype)
    assert not optimize_for_cpu(llm.engine.runner.model)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                       SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_fused_forward_matches_the_eager_forward_on_a_prefill_and_decode_mix(checkpoint_factory):
    """Fast and eager engines on the same weights give the same greedy tokens and logprobs
    (to float rounding) on a batch mixing long prefills with decodes."""
    path = checkpoint_factory("qwen3", head_dim=32)
    batch = prompts(vocab=400)
    fast = generate(fast_llm(path), batch)
    eager = generate(LLM(path, dtype="float32"), batch)
    for a, b in zip(fast, eager):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la = [lp[t].logprob for lp, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
        lb = [lp[t].logprob for lp, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
        assert la == pytest.approx(lb, abs=1e-5)


def test_a_model_off_the_cpu_keeps_its_forward():
    """What a CUDA model meets (checked on the meta device, which no CPU kernel can read)."""
    from llmserve.models.qwen3 import Qwen3ForCausalLM

    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    assert not optimize_for_cpu(model)
    assert model.model.fused_forward is None


@pytest.mark.skipif(not cpu_packed_gemm.available(), reason="torch without MKL")
def test_decode_gemms_use_packed_weights_within_the_budget(checkpoint_factory, monkeypatch):
    """The LM head and every layer GEMM get MKL-packed copies by default (biases included:
    Qwen2), the same tokens come out without them, and a zero budget or eager packs nothing."""
    llm = fast_llm(checkpoint_factory("qwen2"))
    model = llm.engine.runner.model
    layers = model.model.fused_forward.layers
    assert model.lm_head.packed is not None
    assert all(x is not None for layer in layers
               for x in (layer.qkv_p, layer.o_p, layer.gate_up_p, layer.down_p))
    batch = prompts(vocab=400)[:6]
    packed = generate(llm, batch)
    assert not optimize_for_cpu(model, eager=True)
    assert model.lm_head.packed is None
    monkeypatch.setenv(cpu_packed_gemm.BUDGET_ENV, "0")
    assert optimize_for_cpu(model)
    assert model.lm_head.packed is None
    assert all(layer.qkv_p is None for layer in model.model.fused_forward.layers)
    plain = generate(llm, batch)
    for a, b in zip(packed, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la = [lp[t].logprob for lp, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
        lb = [lp[t].logprob for lp, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
        assert la == pytest.approx(lb, abs=1e-5)


def test_layers_in_row_slices_give_the_same_tokens(checkpoint_factory, monkeypatch):
    """Prefill steps longer than SLICE_ROWS run the input norm, qkv and rotary, then o_proj, the
    norm and the MLP slice by slice: with slices of 16 rows every prompt of the batch is split,
    and tokens and logprobs stay those of one slice."""
    path = checkpoint_factory("qwen3", head_dim=32)
    batch = prompts(vocab=400)
    whole = generate(fast_llm(path), batch)
    monkeypatch.setattr(cpu_fast_path, "SLICE_ROWS", 16)
    sliced = generate(fast_llm(path), batch)
    for a, b in zip(whole, sliced):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la = [lp[t].logprob for lp, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
        lb = [lp[t].logprob for lp, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
        assert la == pytest.approx(lb, abs=1e-5)


@pytest.mark.parametrize("engine_args", [{}, {"max_num_batched_tokens": 24}],
                         ids=["whole-prompts", "chunked"])
def test_last_layer_runs_only_the_sampled_rows(checkpoint_factory, monkeypatch, engine_args):
    """Prefill steps hand the model their sampled rows (`OutputRows`): the last layer attends,
    projects and runs its MLP for those rows only, and they come out as the same rows of the
    whole forward would. Each pruned step is checked here against that whole forward (run again
    on the same inputs: storing the same k and v twice changes nothing). Chunked prompts give
    steps with decode rows, chunks over cached context and chunks that sample nothing."""
    from llmserve.attention.metadata import get_attention_metadata

    checked, sizes = [], []
    whole_forward = FusedCPUForward.__call__

    def checking_forward(self, input_ids, positions):
        meta = get_attention_metadata()
        rows = meta.output_rows
        out = whole_forward(self, input_ids, positions)
        if rows is not None:
            meta.output_rows = None
            full = whole_forward(self, input_ids, positions)
            meta.output_rows = rows
            assert out.shape == (len(rows.tokens), full.shape[1])
            torch.testing.assert_close(out, full[rows.tokens], rtol=1e-4, atol=1e-5)
            checked.append(len(rows.tokens))
            sizes.append(len(input_ids))
        return out

    monkeypatch.setattr(FusedCPUForward, "__call__", checking_forward)
    path = checkpoint_factory("qwen3", head_dim=32)
    llm = fast_llm(path, **engine_args)
    batch = prompts(vocab=400)
    outputs = generate(llm, batch)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [MAX_TOKENS] * len(batch)
    assert checked and all(n < size for n, size in zip(checked, sizes))
    if engine_args:  # one long prompt alone: its first chunks sample nothing
        checked.clear()
        generate(llm, [list(range(3, 103))])
        assert checked[:4] == [0, 0, 0, 0]


def test_prompt_logprobs_and_pure_decode_steps_keep_every_row(checkpoint_factory, monkeypatch):
    """Steps that score prompt tokens read every row's hidden state, and all-decode steps
    sample every row: the runner sets no output rows for them."""
    from llmserve.attention.metadata import get_attention_metadata

    seen = []
    whole_forward = FusedCPUForward.__call__

    def spying_forward(self, input_ids, positions):
        seen.append((len(input_ids), get_attention_metadata().output_rows))
        return whole_forward(self, input_ids, positions)

    monkeypatch.setattr(FusedCPUForward, "__call__", spying_forward)
    llm = fast_llm(checkpoint_factory("qwen3", head_dim=32))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=1)
    out = llm.generate([{"prompt_token_ids": list(range(5, 40))}], params, use_tqdm=False)
    assert len(out[0].prompt_logprobs) == 35
    assert seen[0] == (35, None)  # the prefill, scored
    assert all(n == 1 and rows is None for n, rows in seen[1:])  # decodes
