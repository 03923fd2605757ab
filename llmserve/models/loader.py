"""Load a Hugging Face checkpoint directory into an llmserve model (safetensors only, no pickle).

Under tensor parallelism each rank builds its shard of the model and loads only its slice of
every weight (safetensors slices are read lazily from the memory-mapped file).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from llmserve.layers.linear import Loaded, default_weight_loader
from llmserve.models.registry import resolve_model_class

# Tensors that checkpoints carry but the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's weight files: from the shard index if there is one, else every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"no *.safetensors weights in {str(model_dir)!r} (pickled .bin checkpoints are not loaded)"
        )
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"checkpoint shards listed in the index are missing: {missing}")
    return files


def iterate_weights(model_dir: str | Path) -> Iterator[tuple[str, Loaded]]:
    """(name, lazy slice) for every checkpoint tensor; nothing is read until a loader slices it,
    so a tensor-parallel rank reads only its own part of each weight."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_slice(name)


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Hand every checkpoint tensor to its parameter's loader; raise on gaps or extras.

    A parameter's module may define `weight_loader(param, loaded, shard)` (fused projections,
    tensor-parallel shards); other parameters are copied whole.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in iterate_weights(model_dir):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
            continue
        target, shard = _target(model, name)
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        module = model.get_submodule(target.rsplit(".", 1)[0]) if "." in target else model
        try:
            if hasattr(module, "weight_loader"):
                module.weight_loader(param, tensor, shard)
            else:
                default_weight_loader(param, tensor)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        loaded.add(f"{target}:{shard}" if shard else target)
    _check_complete(model, params, loaded)


def _target(model: nn.Module, name: str) -> tuple[str, str | None]:
    """(parameter name, shard) for a checkpoint tensor: the model's own mapping first (MoE
    experts stacked into one parameter), then the fused projections of `packed_modules`."""
    mapper = getattr(model, "map_checkpoint_name", None)
    mapped = mapper(name) if mapper is not None else None
    if mapped is not None:
        return mapped
    for fragment, (fused, shard_name) in getattr(model, "packed_modules", {}).items():
        if f".{fragment}." in name:
            return name.replace(f".{fragment}.", f".{fused}."), shard_name
    return name, None


def _check_complete(model: nn.Module, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
    missing = []
    for name in params:
        module_name = name.rsplit(".", 1)[0]
        module = model.get_submodule(module_name)
        shards = getattr(module, "shard_offsets", None)
        if hasattr(module, "missing_shards"):  # stacked experts keep their own account
            leaf = name.rsplit(".", 1)[-1]
            missing += [f"{name}[{s}]" for s in module.missing_shards(leaf)]
        elif shards:
            missing += [f"{name}[{s}]" for s in shards if f"{name}:{s}" not in loaded]
        elif name not in loaded:
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def load_model(
    model_dir: str | Path, hf_config: dict, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Build the model for `hf_config` on `device` in `dtype` and load its weights."""
    cls = resolve_model_class(hf_config)
    cfg = _flatten_text_config(hf_config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    for module in model.modules():  # rotary caches stay float32 whatever the model dtype
        if hasattr(module, "cos_sin_cache"):
            module.cos_sin_cache = module.cos_sin_cache.float()
    load_weights(model, model_dir)
    return model.eval()


def _flatten_text_config(hf_config: dict) -> dict:
    """Some configs nest the decoder under `text_config`; the models read a flat dict."""
    cfg = dict(hf_config)
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg.update(cfg["text_config"])
    required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    return cfg
