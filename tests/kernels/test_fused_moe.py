"""Fused MoE: the Triton kernel against its torch twin, routing against transformers' routers,
and the stacked-expert weight loading (per-expert, fused, tensor-parallel shards)."""

from __future__ import annotations

import pytest
import torch

from llmserve.kernels import ref
from llmserve.kernels.fused_moe import fused_moe, moe_align, moe_block_config
from llmserve.layers import fused_moe as moe_layer
from llmserve.layers.fused_moe import FusedMoE, expert_checkpoint_target, select_experts


def _weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5
    return w13.to(dtype), w2.to(dtype)


def _skewed_routing(tokens: int, num_experts: int, top_k: int, seed: int = 0):
    """Top-k ids where low-numbered experts are hot and the last expert never gets a token."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.linspace(3.0, 0.0, num_experts)
    logits = torch.randn(tokens, num_experts, generator=gen) + bias
    logits[:, -1] = -1e9
    return select_experts(logits, top_k, renormalize=True, weight_dtype=None)


# (tokens, experts, top_k, hidden, intermediate): top-k of 1, 2 and 8; 1 to 256 tokens; hidden
# and intermediate sizes that are not multiples of the tiles.
CASES = [
    (1, 4, 1, 32, 16),
    (1, 16, 8, 32, 16),
    (3, 8, 2, 48, 24),
    (17, 10, 8, 32, 40),
    (64, 8, 2, 32, 16),
    (256, 4, 2, 32, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "t{}-e{}-k{}-h{}-i{}".format(*c))
def test_kernel_matches_twin(case, dtype):
    tokens, experts, top_k, hidden, inter = case
    w13, w2 = _weights(experts, hidden, inter, dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    weights, ids = _skewed_routing(tokens, experts, top_k)
    assert int(ids.max()) < experts - 1  # one expert gets no token
    got = fused_moe(x, w13, w2, weights, ids)
    want = ref.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_kernel_with_every_tile_size():
    # Loads far above and below one tile per expert, at each BLOCK_M the config can pick.
    w13, w2 = _weights(6, 32, 16, torch.float32)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    weights, ids = _skewed_routing(40, 6, 3, seed=3)
    want = ref.fused_moe(x, w13, w2, weights, ids)
    for block_m in (16, 32, 64):
        cfg = {"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}
        torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, cfg), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (9, 2), (70, 8)])
def test_twin_grouped_gemm_path_matches_expert_loop(tokens, top_k):
    w13, w2 = _weights(16, 32, 24, torch.float32)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(7))
    weights, ids = _skewed_routing(tokens, 16, top_k)
    torch.testing.assert_close(ref.fused_moe(x, w13, w2, weights, ids),
                               ref.fused_moe_loop(x, w13, w2, weights, ids), atol=1e-6, rtol=1e-5)


def test_empty_batch_and_bad_shapes():
    w13, w2 = _weights(4, 32, 16, torch.float32)
    empty = fused_moe(torch.empty(0, 32), w13, w2, torch.empty(0, 2), torch.empty(0, 2, dtype=torch.long))
    assert empty.shape == (0, 32)
    with pytest.raises(ValueError, match="shapes do not agree"):
        fused_moe(torch.zeros(2, 16), w13, w2, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="share a dtype"):
        fused_moe(torch.zeros(2, 32).half(), w13, w2, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("tokens,top_k,block_m", [(1, 1, 16), (5, 2, 16), (33, 8, 32), (200, 2, 64)])
def test_align_sorts_by_expert_in_padded_tiles(tokens, top_k, block_m):
    experts = 12
    _, ids = _skewed_routing(tokens, experts, top_k)
    sorted_ids, tile_expert = moe_align(ids, experts, block_m)
    n = tokens * top_k
    real = sorted_ids[sorted_ids < n].long()
    assert sorted(real.tolist()) == list(range(n))  # every (token, slot) exactly once
    flat = ids.reshape(-1)
    for tile, expert in enumerate(tile_expert.tolist()):
        rows = sorted_ids[tile * block_m : (tile + 1) * block_m].long()
        rows = rows[rows < n]
        if expert == experts:  # past the last run: padding only
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and bool((flat[rows] == expert).all())


def test_block_config_follows_rows_per_expert():
    assert moe_block_config(1, 8, 128, 2048, 768, torch.bfloat16)["BLOCK_M"] == 16
    assert moe_block_config(512, 2, 8, 4096, 14336, torch.bfloat16)["BLOCK_M"] == 64


@pytest.mark.parametrize("family,norm", [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True)])
def test_routing_matches_transformers(family, norm):
    import transformers

    hidden, experts, top_k = 16, 8, 2
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(hidden_size=hidden, num_experts=experts,
                                          num_experts_per_tok=top_k, norm_topk_prob=norm)
        router = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(cfg)
    else:
        cfg = transformers.MixtralConfig(hidden_size=hidden, num_local_experts=experts,
                                         num_experts_per_tok=top_k)
        router = transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(generator=torch.Generator().manual_seed(0))
        x = torch.randn(9, hidden, generator=torch.Generator().manual_seed(1))
        _, want_w, want_ids = router(x)
    dtype = x.dtype if family == "qwen3_moe" else None
    got_w, got_ids = select_experts(x @ router.weight.T, top_k, norm, dtype)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-6)
    if norm:
        torch.testing.assert_close(got_w.sum(-1), torch.ones(9))


def test_checkpoint_names_map_to_stacked_shards():
    qwen = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    assert expert_checkpoint_target("model.layers.3.mlp.experts.7.up_proj.weight", qwen) == (
        "model.layers.3.mlp.experts.w13", "up:7")
    assert expert_checkpoint_target("model.layers.0.mlp.experts.down_proj", qwen) == (
        "model.layers.0.mlp.experts.w2", "down")
    assert expert_checkpoint_target("model.layers.0.mlp.gate.weight", qwen) is None
    assert expert_checkpoint_target("model.layers.0.mlp.gate_proj.weight", qwen) is None


def _per_expert_tensors(w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
    inter = w2.shape[2]
    out = {}
    for e in range(w13.shape[0]):
        out[f"gate:{e}"], out[f"up:{e}"] = w13[e, :inter], w13[e, inter:]
        out[f"down:{e}"] = w2[e]
    return out


def _load(layer: FusedMoE, tensors: dict[str, torch.Tensor]) -> None:
    for shard, tensor in tensors.items():
        param = layer.w2 if shard.startswith("down") else layer.w13
        layer.weight_loader(param, tensor, shard)


def test_tensor_parallel_shards_sum_to_the_full_output(monkeypatch):
    experts, hidden, inter, top_k = 4, 32, 24, 2
    w13, w2 = _weights(experts, hidden, inter, torch.float32)
    x = torch.randn(7, hidden, generator=torch.Generator().manual_seed(4))
    weights, ids = _skewed_routing(7, experts, top_k)
    want = ref.fused_moe(x, w13, w2, weights, ids)
    total = torch.zeros_like(want)
    for rank in range(2):
        monkeypatch.setattr(moe_layer, "get_tp_rank", lambda r=rank: r)
        monkeypatch.setattr(moe_layer, "get_tp_world_size", lambda: 2)
        layer = FusedMoE(experts, top_k, hidden, inter, renormalize=True,
                         weights_in_activation_dtype=False)
        assert layer.w13.shape == (experts, inter, hidden) and layer.w2.shape == (experts, hidden, inter // 2)
        # Even ranks read the per-expert tensors, odd ones transformers' fused layout.
        if rank == 0:
            _load(layer, _per_expert_tensors(w13, w2))
        else:
            _load(layer, {"gate_up": w13, "down": w2})
        assert layer.missing_shards("w13") == [] and layer.missing_shards("w2") == []
        total += ref.fused_moe(x, layer.w13, layer.w2, weights, ids)
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)


def test_loader_reports_missing_experts_and_bad_shapes():
    w13, w2 = _weights(3, 16, 8, torch.float32)
    layer = FusedMoE(3, 2, 16, 8, renormalize=False, weights_in_activation_dtype=True)
    tensors = _per_expert_tensors(w13, w2)
    del tensors["up:1"], tensors["down:2"]
    _load(layer, tensors)
    assert layer.missing_shards("w13") == ["up:1"] and layer.missing_shards("w2") == ["down:2"]
    with pytest.raises(ValueError, match="checkpoint shape"):
        layer.weight_loader(layer.w2, torch.zeros(16, 9), "down:0")
    with pytest.raises(ValueError, match="unknown expert shard"):
        layer.weight_loader(layer.w13, w13[0, :8], "gate:3")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        FusedMoE(3, 4, 16, 8, renormalize=False, weights_in_activation_dtype=True)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("shape", [(128, 8, 256, 96), (8, 2, 512, 1792)], ids=["qwen3-moe", "mixtral"])
def test_bf16_on_gpu(shape, tokens):
    """bf16 (which the interpreter cannot check) at the two families' expert ratios."""
    experts, top_k, hidden, inter = shape
    device = torch.device("cuda")
    w13, w2 = (w.to(device) for w in _weights(experts, hidden, inter, torch.bfloat16))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(6)).to(device)
    weights, ids = select_experts(logits, top_k, renormalize=True, weight_dtype=torch.bfloat16)
    got = fused_moe(x, w13, w2, weights, ids).float()
    want = ref.fused_moe(x.float(), w13.float(), w2.float(), weights.float(), ids)
    assert float((got - want).abs().max()) <= 0.03 * float(want.abs().max()) + 1e-3
