"""Mixtral (8x7B, 8x22B): the Mistral decoder with a sparse MLP in every layer.

Checkpoints name the MLP `block_sparse_moe` with experts `w1` (gate), `w3` (up) and `w2` (down).
Routing: the top `num_experts_per_tok` (2) of a softmax over the router logits, renormalised
(the same as a softmax over the top-2 logits), the weights kept in float32 as transformers does.
"""

from __future__ import annotations

from torch import nn

from llmserve.layers.fused_moe import SparseMoeBlock
from llmserve.models.moe import MoeDecoderLayer, MoeForCausalLM, MoeModel, config_int


class MixtralModel(MoeModel):
    layer_cls = MoeDecoderLayer

    def build_mlp(self, cfg: dict, layer_index: int) -> nn.Module:
        return SparseMoeBlock(
            cfg["hidden_size"],
            config_int(cfg, "num_local_experts", "num_experts"),
            config_int(cfg, "num_experts_per_tok"),
            config_int(cfg, "intermediate_size"),
            renormalize=True,
            weights_in_activation_dtype=False,
            hidden_act=cfg.get("hidden_act", "silu"),
        )


class MixtralForCausalLM(MoeForCausalLM):
    model_cls = MixtralModel
    expert_projections = {"w1": "gate", "w3": "up", "w2": "down"}

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        # Mixtral checkpoints say block_sparse_moe; transformers' own layout (and ours) says mlp.
        renamed = name.replace(".block_sparse_moe.", ".mlp.")
        mapped = super().map_checkpoint_name(renamed)
        if mapped is None and renamed != name:
            return renamed, None
        return mapped
