"""Shared structure of the mixture-of-experts decoders (Qwen3-MoE, Mixtral).

The decoder is the Llama one (attention, norms, residual stream); what differs is each layer's
MLP, which a family picks by layer index (`MoeModel.build_mlp`): a `SparseMoeBlock` (router and
stacked experts) or, for Qwen3-MoE's dense layers, the Llama MLP. The fused CPU forward is for
dense decoders, so these models run the eager per-layer path (see `cpu_fast_path`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from llmserve.layers.fused_moe import expert_checkpoint_target
from llmserve.layers.rmsnorm import RMSNorm
from llmserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


def config_int(cfg: dict, *keys: str) -> int:
    """The first of `keys` that the config sets, as an int; ValueError when none is."""
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise ValueError(f"config.json lacks {' / '.join(keys)}")


class MoeDecoderLayer(LlamaDecoderLayer):
    """The Llama decoder layer with its MLP left for the model to set by layer index.

    The extra positional arguments are whatever `LlamaModel` passes a layer besides the config
    (its attention window); they go to the attention as in `LlamaDecoderLayer`.
    """

    def __init__(self, cfg: dict, *attention_args: Any) -> None:
        nn.Module.__init__(self)
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = self.attention_cls(cfg, *attention_args)
        self.mlp: nn.Module = nn.Identity()  # replaced by MoeModel.__init__
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)


class MoeModel(LlamaModel):
    layer_cls: type[LlamaDecoderLayer] = MoeDecoderLayer

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        for index, layer in enumerate(self.layers):
            layer.mlp = self.build_mlp(cfg, index)

    def build_mlp(self, cfg: dict, layer_index: int) -> nn.Module:
        raise NotImplementedError


class MoeForCausalLM(LlamaForCausalLM):
    """An MoE causal LM: the Llama head and loader rules plus the experts' checkpoint names."""

    model_cls: type[LlamaModel] = MoeModel
    # Per-expert checkpoint projection name -> part of the stacked weights.
    expert_projections: dict[str, str] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        """(parameter name, shard) for an expert tensor of the checkpoint, else None."""
        return expert_checkpoint_target(name, self.expert_projections)
