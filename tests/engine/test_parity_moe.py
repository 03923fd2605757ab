"""Mixture-of-experts models (Qwen3-MoE, Mixtral) token-exact against transformers (fp32).

Each model runs three ways (default, a pool small enough to preempt, a token budget small
enough to chunk prefills), with the Triton kernel (interpreter on CPU) against the torch path,
and from a sharded checkpoint and from transformers' fused expert layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from llmserve import LLM, SamplingParams
from llmserve.kernels import ops
from tests.engine.parity import (
    assert_exact_under_preemption,
    assert_exact_with_chunked_prefill,
    assert_matches,
    prefix_prompts,
    run_llmserve,
)

MAX_TOKENS = 8
# Qwen3-MoE with a dense layer between sparse ones (mlp_only_layers); Mixtral as built.
MODELS = {
    "qwen3_moe": {"num_hidden_layers": 3, "mlp_only_layers": [1]},
    "mixtral": {},
}
PREFIX = 32


def make_prompts(vocab: int = 400, seed: int = 0) -> list[list[int]]:
    """8 prompts of 1..150 tokens; every other one starts with the same 32-token prefix."""
    return prefix_prompts([1, 17, 33, 64, 100, 150, 5, 45], vocab, PREFIX, seed)


@torch.inference_mode()
def hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
        return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


@pytest.fixture(scope="module", params=list(MODELS))
def reference(request, checkpoint_factory):
    path = checkpoint_factory(request.param, **MODELS[request.param])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = make_prompts()
    return path, prompts, [hf_greedy(model, p) for p in prompts]


def test_greedy_batch_matches_transformers(reference):
    path, prompts, expected = reference
    llm, outputs = run_llmserve(path, prompts, MAX_TOKENS)
    assert_matches(outputs, expected)
    stats = llm.stats()
    assert stats["prefix_cache_hits"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert llm.engine.runner.model.model.fused_forward is None  # eager MoE path


def test_greedy_with_preemption_matches_transformers(reference):
    assert_exact_under_preemption(*reference, MAX_TOKENS, num_kv_blocks=12)


def test_greedy_with_chunked_prefill_matches_transformers(reference):
    assert_exact_with_chunked_prefill(*reference, MAX_TOKENS, budget=24)


def test_triton_kernel_matches_torch_path(reference, monkeypatch):
    """The engine with the fused-MoE Triton kernel (interpreter on CPU) gives the same tokens."""
    from llmserve.kernels.fused_moe import fused_moe as triton_fused_moe

    path, prompts, expected = reference
    batch_sizes: list[int] = []

    def triton_path(x, w13, w2, topk_weights, topk_ids):
        batch_sizes.append(x.shape[0])
        return triton_fused_moe(x, w13, w2, topk_weights, topk_ids)

    monkeypatch.setattr(ops, "fused_moe", triton_path)
    short = [p[:20] for p in prompts[:4]]
    _, outputs = run_llmserve(path, short, MAX_TOKENS, max_num_batched_tokens=16, enable_prefix_caching=False)
    monkeypatch.undo()
    _, want = run_llmserve(path, short, MAX_TOKENS, max_num_batched_tokens=16, enable_prefix_caching=False)
    for got, ref_out in zip(outputs, want):
        assert got.outputs[0].token_ids == ref_out.outputs[0].token_ids
        got_lp = [lp[t].logprob for lp, t in zip(got.outputs[0].logprobs, got.outputs[0].token_ids)]
        want_lp = [lp[t].logprob for lp, t in zip(ref_out.outputs[0].logprobs, ref_out.outputs[0].token_ids)]
        assert got_lp == pytest.approx(want_lp, abs=1e-4)
    assert max(batch_sizes) > 1 and min(batch_sizes) == 1  # chunked prefill rows and decode rows


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)


def test_sharded_checkpoint_loads(reference, tmp_path):
    path, prompts, expected = reference
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    _copy_tokenizer(Path(path), tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    # One expert's gate and up sit in different files somewhere: stacking spans shards.
    expert_files = {f for name, f in index["weight_map"].items() if ".experts." in name}
    assert len(expert_files) > 1
    _, outputs = run_llmserve(str(tmp_path), prompts[:3], MAX_TOKENS)
    assert_matches(outputs, expected[:3])


def test_fused_expert_layout_loads(reference, tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2I, H], experts.down_proj
    [E, H, I]) loads to the same model as the per-expert tensors."""
    path, prompts, expected = reference
    tensors = load_file(str(Path(path) / "model.safetensors"))
    fused: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, list]] = {}
    parts = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}
    for name, tensor in tensors.items():
        if ".experts." not in name:
            fused[name] = tensor
            continue
        prefix, rest = name.split(".experts.")
        index, proj, _ = rest.split(".")
        slots = experts.setdefault(prefix.replace("block_sparse_moe", "mlp"), {}).setdefault(index, [None] * 3)
        slots[parts[proj]] = tensor
    for prefix, by_expert in experts.items():
        ordered = [by_expert[str(e)] for e in range(len(by_expert))]
        fused[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat(s[:2]) for s in ordered])
        fused[f"{prefix}.experts.down_proj"] = torch.stack([s[2] for s in ordered])
    save_file(fused, str(tmp_path / "model.safetensors"))
    shutil.copy(Path(path) / "config.json", tmp_path / "config.json")
    _copy_tokenizer(Path(path), tmp_path)
    _, outputs = run_llmserve(str(tmp_path), prompts[:3], MAX_TOKENS)
    assert_matches(outputs, expected[:3])


def test_missing_expert_is_a_clear_error(reference, tmp_path):
    path, _, _ = reference
    tensors = load_file(str(Path(path) / "model.safetensors"))
    dropped = sorted(n for n in tensors if ".experts.1." in n)[0]
    del tensors[dropped]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(Path(path) / "config.json", tmp_path / "config.json")
    _copy_tokenizer(Path(path), tmp_path)
    with pytest.raises(ValueError, match=r"missing weights: .*experts\.w[12]3?\[(gate|up|down):1\]"):
        LLM(str(tmp_path), dtype="float32")


@pytest.mark.timeout(180)
def test_tensor_parallel_2_matches_transformers(reference):
    """Each rank holds half of every expert's intermediate dimension; one all-reduce sums them."""
    path, prompts, expected = reference
    llm = LLM(path, dtype="float32", tensor_parallel_size=2)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert_matches(outputs, expected[:4])
