"""Gemma 3 (text): greedy tokens and logprobs against transformers' Gemma3ForCausalLM (fp32).

Variants: the builder's defaults (window longer than every prompt), and one where local layers
matter (sliding_window 8 under prompts of up to 88 tokens) with untied embeddings, linear rope
scaling on the global layers, its own local rope base and final-logit soft-capping. Each runs
three ways: default, a pool small enough to preempt, a token budget that chunks prefills.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.models.gemma3 import modeling_gemma3 as hf_gemma3

from llmserve import LLM, SamplingParams
from llmserve.layers.activation import GeluAndMul
from llmserve.layers.rmsnorm import GemmaRMSNorm
from llmserve.layers.rotary import layer_type_rope_parameters
from llmserve.models.cpu_fast_path import fast_path_blocker
from llmserve.models.gemma3 import Gemma3ForCausalLM, gemma3_layer_types
from llmserve.models.loader import load_model
from tests.engine.parity import (
    assert_exact_under_preemption,
    assert_exact_with_chunked_prefill,
    assert_matches,
    hf_greedy,
    prefix_prompts,
    run_llmserve,
)

MAX_TOKENS = 8
WINDOWED = {
    "sliding_window": 8,
    "tie_word_embeddings": False,
    "final_logit_softcapping": 3.0,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    },
}
VARIANTS = {"default": {}, "windowed": WINDOWED}


def make_prompts(seed: int = 0) -> list[list[int]]:
    """10 prompts of 1..88 tokens (ids clear of the specials); half share a 24-token prefix."""
    return prefix_prompts([1, 5, 9, 17, 24, 31, 33, 48, 64, 7], 500, 24, seed)


def hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, checkpoint_factory):
    path = checkpoint_factory("gemma3", **VARIANTS[request.param])
    model = hf_model(path)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    prompts = make_prompts()
    return path, prompts, [hf_greedy(model, p, MAX_TOKENS) for p in prompts]


def test_greedy_batch_matches_transformers(reference):
    path, prompts, expected = reference
    llm, outputs = run_llmserve(path, prompts, MAX_TOKENS)
    assert_matches(outputs, expected)
    stats = llm.stats()
    assert stats["prefix_cache_hits"] > 0  # the shared prefix was reused
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_greedy_with_preemption_matches_transformers(reference):
    assert_exact_under_preemption(*reference, MAX_TOKENS, num_kv_blocks=12)


def test_greedy_with_chunked_prefill_matches_transformers(reference):
    assert_exact_with_chunked_prefill(*reference, MAX_TOKENS, budget=32)


def test_window_and_variant_settings_change_the_output(checkpoint_factory):
    """The windowed variant's settings are live: with the window alone made long, the same
    weights give other tokens (so the parity above covers the local layers' window)."""
    prompt = make_prompts()[7]
    narrow = hf_greedy(hf_model(checkpoint_factory("gemma3", **WINDOWED)), prompt, 3)
    wide = hf_greedy(
        hf_model(checkpoint_factory("gemma3", **{**WINDOWED, "sliding_window": 4096})), prompt, 3)
    assert narrow[0] != wide[0]


def test_legacy_config_spelling_gives_the_same_tokens(checkpoint_factory, tmp_path):
    """transformers 4.x configs: rope_theta / rope_local_base_freq / rope_scaling and
    sliding_window_pattern instead of rope_parameters and layer_types."""
    src = checkpoint_factory("gemma3", **WINDOWED)
    legacy = tmp_path / "legacy"
    shutil.copytree(src, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    cfg.update(rope_theta=rope["full_attention"]["rope_theta"], sliding_window_pattern=2,
               rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
               rope_scaling={"rope_type": "linear", "factor": 4.0})
    (legacy / "config.json").write_text(json.dumps(cfg))
    prompts = make_prompts()[7:9]
    expected = [hf_greedy(hf_model(src), p, MAX_TOKENS) for p in prompts]
    assert_matches(run_llmserve(str(legacy), prompts, MAX_TOKENS)[1], expected)


def _stop_checkpoint(src: str, dst, eot: int, prompt: list[int]) -> None:
    """Copy an untied checkpoint with lm_head row `<end_of_turn>` = 2 x the row of the token
    greedy picks third, so greedy emits `<end_of_turn>` within three steps."""
    shutil.copytree(src, dst)
    third = hf_greedy(hf_model(src), prompt, 3)[0][2]
    weights = load_file(str(dst / "model.safetensors"))
    weights["lm_head.weight"][eot] = 2.0 * weights["lm_head.weight"][third]
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_chat_template_and_end_of_turn_stops(checkpoint_factory, tmp_path):
    src = checkpoint_factory("gemma3", tie_word_embeddings=False)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello, how are you today?"}]
    llm = LLM(src, dtype="float32")
    tok = llm.engine.tokenizer
    text = tok.apply_chat_template(messages)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHello, how are you today?"
                    "<end_of_turn>\n<start_of_turn>model\n")
    eot = tok.token_to_id("<end_of_turn>")
    assert eot in tok.eos_token_ids and tok.token_to_id("<eos>") in tok.eos_token_ids
    with pytest.raises(ValueError, match="alternate"):
        llm.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                 use_tqdm=False)
    prompt = tok.encode(text, add_special_tokens=False)
    assert prompt[0] == tok.token_to_id("<bos>") and prompt.count(eot) == 1
    stop_dir = tmp_path / "stop"
    _stop_checkpoint(src, stop_dir, eot, prompt)
    expected = hf_greedy(hf_model(str(stop_dir)), prompt, MAX_TOKENS, stop_at_eos=True)
    assert expected[0][-1] == eot
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0)
    out = LLM(str(stop_dir), dtype="float32").chat(messages, params, use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt
    assert out.outputs[0].finish_reason == "stop"
    assert_matches([out], [expected])
    assert "<end_of_turn>" not in out.outputs[0].text


def test_gemma_norm_and_gelu_match_transformers():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 3, 32).to(dtype)
        ours, theirs = GemmaRMSNorm(32, 1e-6), hf_gemma3.Gemma3RMSNorm(32, 1e-6)
        with torch.no_grad():
            theirs.weight.copy_(torch.randn(32) * 0.3)
            ours.weight.copy_(theirs.weight)
            assert torch.equal(ours(x), theirs(x))
    gate_up = torch.randn(4, 64)
    expected = torch.nn.functional.gelu(gate_up[:, :32], approximate="tanh") * gate_up[:, 32:]
    assert torch.equal(GeluAndMul("tanh")(gate_up), expected)


def test_layer_types_and_rope_from_either_config_spelling():
    assert gemma3_layer_types({"num_hidden_layers": 7}) == ["sliding_attention"] * 5 + [
        "full_attention", "sliding_attention"]  # transformers' default pattern: 6
    assert gemma3_layer_types({"num_hidden_layers": 3, "sliding_window_pattern": 2}) == [
        "sliding_attention", "full_attention", "sliding_attention"]
    given = ["full_attention", "sliding_attention"]
    assert gemma3_layer_types({"num_hidden_layers": 2, "layer_types": given}) == given
    with pytest.raises(ValueError, match="layer_types"):
        gemma3_layer_types({"num_hidden_layers": 2, "layer_types": ["sliding_attention"]})
    legacy = {"rope_theta": 1e6, "rope_local_base_freq": 1e4,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    assert layer_type_rope_parameters(legacy, "full_attention", 5.0) == (1e6, legacy["rope_scaling"])
    assert layer_type_rope_parameters(
        legacy, "sliding_attention", 5.0, "rope_local_base_freq") == (1e4, None)
    nested = {"rope_parameters": WINDOWED["rope_parameters"]}
    full = WINDOWED["rope_parameters"]["full_attention"]
    assert layer_type_rope_parameters(nested, "full_attention", 5.0) == (1e6, full)
    assert layer_type_rope_parameters(nested, "sliding_attention", 5.0) == (100.0, None)


@pytest.mark.parametrize("override, match", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"hidden_activation": "relu"}, "hidden_activation"),
])
def test_unsupported_settings_are_refused(checkpoint_factory, override, match):
    path = checkpoint_factory("gemma3")
    cfg = {**json.loads(open(f"{path}/config.json").read()), **override}
    with pytest.raises(ValueError, match=match):
        Gemma3ForCausalLM(cfg)


def test_model_refuses_windows_the_kv_cache_would_read_otherwise(checkpoint_factory, monkeypatch):
    import llmserve.models.gemma3 as gemma3

    cfg = json.loads(open(f"{checkpoint_factory('gemma3')}/config.json").read())
    monkeypatch.setattr(gemma3, "layer_sliding_windows", lambda cfg: [8] * 4)
    with pytest.raises(ValueError, match="ambiguous"):
        Gemma3ForCausalLM(cfg)


def test_gemma3_runs_the_eager_forward_not_the_fused_cpu_path(checkpoint_factory):
    path = checkpoint_factory("gemma3")
    cfg = json.loads(open(f"{path}/config.json").read())
    model = load_model(path, cfg, torch.float32, torch.device("cpu"))
    assert "not a Llama-family decoder" in fast_path_blocker(model)


def test_triton_attention_backend_gives_the_torch_backends_tokens(checkpoint_factory):
    """Local (window 8) and global layers through the Triton kernels (the interpreter on CPU),
    with chunked prefills mixed with decode rows and a prefix-cache hit."""
    pytest.importorskip("triton")
    path = checkpoint_factory("gemma3", **WINDOWED)
    rng = random.Random(0)
    shared = [rng.randrange(3, 500) for _ in range(20)]
    prompts = [shared + [rng.randrange(3, 500) for _ in range(5)], [9, 8, 7],
               shared + [rng.randrange(3, 500) for _ in range(9)], [7]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def tokens(backend: str) -> list[list[int]]:
        llm = LLM(path, dtype="float32", block_size=16, attention_backend=backend,
                  max_num_batched_tokens=16, max_num_seqs=4, enforce_eager=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    assert tokens("triton") == tokens("torch")
