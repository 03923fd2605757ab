"""Gemma 3 (text): `Gemma3ForCausalLM`, exact to transformers' modeling_gemma3.

Differences from the Llama decoder: embeddings scaled by sqrt(hidden_size) in the model dtype;
zero-centred RMSNorms (scale 1 + weight, in float32) on q and k and around both the attention
and the MLP (pre- and post-norms, the residual added after the post-norm); attention scaled by
`query_pre_attn_scalar ** -0.5`; a GELU-tanh MLP; layers that alternate between local (sliding
window, own rope base) and global attention (rope scaling, if any, only there); tied embeddings
by default; optional tanh soft-capping of the final logits.
"""

from __future__ import annotations

import torch
from torch import nn

from llmserve.attention.windows import FULL, SLIDING, declared_layer_types, layer_sliding_windows
from llmserve.layers.activation import GeluAndMul
from llmserve.layers.attention import Attention
from llmserve.layers.embedding import VocabParallelEmbedding
from llmserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from llmserve.layers.rmsnorm import GemmaRMSNorm
from llmserve.layers.rotary import RotaryEmbedding, layer_type_rope_parameters
from llmserve.models.llama import LlamaForCausalLM

# Hugging Face's activation names -> torch's GELU approximation.
_GELU_APPROXIMATION = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


def gemma3_layer_types(cfg: dict) -> list[str]:
    """Each layer's attention type: `layer_types` (transformers 5) or, in older configs, every
    `sliding_window_pattern`-th layer global and the rest local."""
    num_layers = cfg["num_hidden_layers"]
    types = declared_layer_types(cfg, default_pattern=6)  # transformers' default for Gemma 3
    if len(types) != num_layers or any(t not in (SLIDING, FULL) for t in types):
        raise ValueError(
            f"layer_types must give {num_layers} entries of {SLIDING!r} or {FULL!r}, got {types!r}"
        )
    return types


def _check_supported(cfg: dict) -> None:
    if cfg.get("attn_logit_softcapping") is not None:
        raise ValueError(
            "attn_logit_softcapping is not supported: the attention kernels do not soft-cap "
            f"scores (got {cfg['attn_logit_softcapping']})"
        )
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention is not supported: llmserve serves causal LMs")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _GELU_APPROXIMATION:
        raise ValueError(
            f"hidden_activation {act!r} is not supported; supported: {sorted(_GELU_APPROXIMATION)}"
        )


def _rotary(cfg: dict, head_dim: int, layer_type: str) -> RotaryEmbedding:
    # transformers' Gemma 3 defaults when a config gives no theta.
    if layer_type == SLIDING:
        theta, scaling = layer_type_rope_parameters(cfg, SLIDING, 10_000.0, "rope_local_base_freq")
    else:
        theta, scaling = layer_type_rope_parameters(cfg, FULL, 1_000_000.0)
    return RotaryEmbedding(head_dim, cfg.get("max_position_embeddings", 131_072), theta, scaling)


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: dict, rotary_emb: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        total_heads = cfg["num_attention_heads"]
        total_kv_heads = cfg.get("num_key_value_heads") or total_heads
        self.head_dim = cfg.get("head_dim") or hidden // total_heads
        bias = bool(cfg.get("attention_bias", False))
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv_heads, bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, bias=bias)
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.q_norm = GemmaRMSNorm(self.head_dim, eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, eps)
        # One module per layer type, shared by the layers of that type (its cos/sin cache is
        # max_position_embeddings x head_dim floats: 128 MiB at Gemma 3's 131072 x 256).
        self.rotary_emb = rotary_emb
        scale = float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5  # HF default: 256
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window=sliding_window
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        self.gate_up_proj = MergedColumnParallelLinear(hidden, {"gate": inter, "up": inter}, bias=False)
        self.down_proj = RowParallelLinear(inter, hidden, bias=False)
        self.act = GeluAndMul(_GELU_APPROXIMATION[act])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, rotary_emb: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = Gemma3Attention(cfg, rotary_emb, sliding_window)
        self.mlp = Gemma3MLP(cfg)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden))
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma3Model(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        _check_supported(cfg)
        hidden = cfg["hidden_size"]
        self.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], hidden)
        # transformers keeps sqrt(hidden) in float32 and casts it to the weights' dtype before
        # the multiply (bf16 rounds sqrt(3072) = 55.43 to 55.5): do the same.
        self.register_buffer(
            "embed_scale", torch.tensor(hidden**0.5, dtype=torch.float32), persistent=False
        )
        head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
        self.layer_types = gemma3_layer_types(cfg)
        window = cfg.get("sliding_window")
        windows = [int(window) if window and t == SLIDING else None for t in self.layer_types]
        if windows != layer_sliding_windows(cfg):
            # The KV cache releases blocks by that reading of the config: the two must agree.
            raise ValueError(
                "this config's sliding-window layers are ambiguous (give layer_types or "
                f"sliding_window_pattern): {windows} vs {layer_sliding_windows(cfg)}"
            )
        rotary = {t: _rotary(cfg, head_dim, t) for t in sorted(set(self.layer_types))}
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, rotary[t], w) for t, w in zip(self.layer_types, windows)
        )
        self.norm = GemmaRMSNorm(hidden, cfg.get("rms_norm_eps", 1e-6))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        hidden = embeds * self.embed_scale.to(embeds.dtype)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 text causal LM. `forward` returns hidden states; `compute_logits` the float32
    logits of the rows that sample, soft-capped by `final_logit_softcapping` when set."""

    model_cls = Gemma3Model
    tie_by_default = True  # Gemma 3's config class defaults to tied embeddings

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        cap = cfg.get("final_logit_softcapping")
        self.final_logit_softcapping = float(cap) if cap is not None else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits; None on tensor-parallel ranks other than 0 (only rank 0 samples)."""
        logits = self.lm_head(hidden)
        if logits is None or self.final_logit_softcapping is None:
            return logits
        cap = self.final_logit_softcapping
        return torch.tanh(logits / cap) * cap

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """None: the soft-capped logits are sampled from compute_logits (tanh can round
        near-equal logits to equal ones, where the first of them wins)."""
        return None
