"""Llama-family decoder (Llama, Mistral, Qwen2; Qwen3 adds q/k norm in qwen3.py).

The model sees only `input_ids` and `positions`; attention reads its metadata from the forward
context. q/k/v and gate/up are fused projections filled by the loader. Under tensor parallelism
each rank builds its shard: q/k/v and gate/up are column-parallel, o_proj and down_proj
row-parallel (one all-reduce each per layer), the embedding and LM head vocab-parallel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmserve.attention.windows import layer_sliding_windows
from llmserve.kernels.common import triton_enabled
from llmserve.layers.activation import SiluAndMul
from llmserve.layers.attention import Attention
from llmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmserve.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from llmserve.layers.rmsnorm import RMSNorm
from llmserve.layers.rotary import RotaryEmbedding, rope_parameters


class LlamaAttention(nn.Module):
    qk_norm = False

    def __init__(self, cfg: dict, sliding_window: int | None = None) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        total_heads = cfg["num_attention_heads"]
        total_kv_heads = cfg.get("num_key_value_heads") or total_heads
        self.head_dim = cfg.get("head_dim") or hidden // total_heads
        bias = bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2"
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv_heads, bias)
        # This rank's heads (all of them at tensor_parallel_size=1).
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            total_heads * self.head_dim, hidden, bias=bool(cfg.get("attention_bias", False))
        )
        theta, scaling = rope_parameters(cfg)
        self.rotary_emb = RotaryEmbedding(
            self.head_dim, cfg.get("max_position_embeddings", 2048), theta, scaling
        )
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, sliding_window
        )
        if self.qk_norm:
            eps = cfg.get("rms_norm_eps", 1e-6)
            self.q_norm = RMSNorm(self.head_dim, eps)
            self.k_norm = RMSNorm(self.head_dim, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if not self.qk_norm and not triton_enabled(qkv):
            # q and k sit side by side in each row: rotate them as one [T, H + KVH, D] tensor.
            heads = self.num_heads + self.num_kv_heads
            qk = self.rotary_emb.rotate(
                positions, qkv[:, : self.q_size + self.kv_size].view(-1, heads, self.head_dim))
            v = qkv[:, self.q_size + self.kv_size :]
            return self.o_proj(self.attn(qk[:, : self.num_heads], qk[:, self.num_heads :], v))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)[0]
            k = self.k_norm(k)[0]
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        bias = bool(cfg.get("mlp_bias", False))
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
        self.gate_up_proj = MergedColumnParallelLinear(hidden, {"gate": inter, "up": inter}, bias=bias)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, cfg: dict, sliding_window: int | None = None) -> None:
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = self.attention_cls(cfg, sliding_window)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)[0]
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        # Mistral's uniform window, Qwen2's max_window_layers or a per-layer list (see windows.py).
        self.layers = nn.ModuleList(self.layer_cls(cfg, w) for w in layer_sliding_windows(cfg))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))
        # Set by `llmserve.models.cpu_fast_path.optimize_for_cpu`: the fused CPU forward.
        self.fused_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.fused_forward is not None:
            return self.fused_forward(input_ids, positions)
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 causal LM. `forward` returns hidden states; logits are separate
    so that only the rows that sample pay for the LM head."""

    model_cls: type[nn.Module] = LlamaModel
    # What a config without `tie_word_embeddings` means (transformers' default per family).
    tie_by_default = False
    # Checkpoint tensor name fragment -> (fused parameter name fragment, shard).
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.config = cfg
        self.model = self.model_cls(cfg)
        self.lm_head = ParallelLMHead(cfg["vocab_size"], cfg["hidden_size"])
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", self.tie_by_default))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    @property
    def prunes_output_rows(self) -> bool:
        """Whether `forward` honours `AttentionMetadata.output_rows` (the fused CPU forward)."""
        return getattr(self.model, "fused_forward", None) is not None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits; None on tensor-parallel ranks other than 0 (only rank 0 samples)."""
        return self.lm_head(hidden)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The argmax of `compute_logits(hidden)` per row (int64) when the LM head can find it
        faster without computing every logit (CPU, `cpu_greedy`); None otherwise."""
        greedy = self.lm_head.greedy
        return None if greedy is None else greedy(hidden)
