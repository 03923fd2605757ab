"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (q/k norm) with sparse MLPs.

Layer i is sparse unless it is in `mlp_only_layers` or (i + 1) is not a multiple of
`decoder_sparse_step`; dense layers use the Llama MLP of width `intermediate_size`. Routing: a
softmax over all experts, the top `num_experts_per_tok`, renormalised when `norm_topk_prob`,
and the weights cast to the activation dtype, as transformers does.
"""

from __future__ import annotations

from torch import nn

from llmserve.layers.fused_moe import SparseMoeBlock
from llmserve.models.llama import LlamaMLP
from llmserve.models.moe import MoeDecoderLayer, MoeForCausalLM, MoeModel, config_int
from llmserve.models.qwen3 import Qwen3Attention


def is_sparse_layer(cfg: dict, layer_index: int) -> bool:
    """Whether Qwen3-MoE layer `layer_index` has experts (transformers' rule)."""
    num_experts = config_int(cfg, "num_experts", "num_local_experts")
    step = int(cfg.get("decoder_sparse_step") or 1)
    only_dense = cfg.get("mlp_only_layers") or []
    return layer_index not in only_dense and num_experts > 0 and (layer_index + 1) % step == 0


class Qwen3MoeDecoderLayer(MoeDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3MoeModel(MoeModel):
    layer_cls = Qwen3MoeDecoderLayer

    def build_mlp(self, cfg: dict, layer_index: int) -> nn.Module:
        if not is_sparse_layer(cfg, layer_index):
            return LlamaMLP(cfg)
        return SparseMoeBlock(
            cfg["hidden_size"],
            config_int(cfg, "num_experts", "num_local_experts"),
            config_int(cfg, "num_experts_per_tok"),
            config_int(cfg, "moe_intermediate_size"),
            renormalize=bool(cfg.get("norm_topk_prob", False)),
            weights_in_activation_dtype=True,
            hidden_act=cfg.get("hidden_act", "silu"),
        )


class Qwen3MoeForCausalLM(MoeForCausalLM):
    model_cls = Qwen3MoeModel
