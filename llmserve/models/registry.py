"""Model classes by the `architectures` entry of a Hugging Face config."""

from __future__ import annotations

from torch import nn

from llmserve.models.gemma3 import Gemma3ForCausalLM
from llmserve.models.llama import LlamaForCausalLM
from llmserve.models.mixtral import MixtralForCausalLM
from llmserve.models.qwen3 import Qwen3ForCausalLM
from llmserve.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}


def resolve_model_class(hf_config: dict) -> type[nn.Module]:
    """Return the class for the first supported architecture, or raise a ValueError that lists them."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported model architecture {archs or '(none given)'}; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
