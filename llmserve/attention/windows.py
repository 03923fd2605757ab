"""Which decoder layers use sliding-window attention, read from a Hugging Face config.

The three conventions in use, as transformers applies them:
- Mistral: one `sliding_window` for every layer (None = full attention); `layer_types` is
  ignored by Mistral's modeling code, so it is ignored here too.
- Qwen2 / Qwen3: the window applies only with `use_sliding_window`, and then to the layers
  `i >= max_window_layers` (the first `max_window_layers` layers keep full attention).
- `layer_types` (recent configs, Gemma 3, Qwen2 saved by transformers 5): layer i is windowed
  iff its entry is "sliding_attention". Older Gemma 3 configs give `sliding_window_pattern`
  instead: every pattern-th layer is global.

A windowed query at position p sees keys at positions > p - window (the last `window`
positions, its own included).
"""

from __future__ import annotations

_QWEN_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
# transformers' default `sliding_window_pattern` for configs that give neither it nor
# `layer_types` (every 6th layer global).
_DEFAULT_PATTERN = {"gemma3_text": 6, "gemma3": 6}


def _window(cfg: dict) -> int | None:
    window = cfg.get("sliding_window")
    if window is None or isinstance(window, bool):
        return None
    if cfg.get("model_type") in _QWEN_TYPES and not cfg.get("use_sliding_window", False):
        return None
    window = int(window)
    if window < 1:
        raise ValueError(f"sliding_window must be a positive integer, got {window}")
    return window


SLIDING, FULL = "sliding_attention", "full_attention"


def declared_layer_types(cfg: dict, default_pattern: int | None = None) -> list[str] | None:
    """Each layer's type as the config declares it: `layer_types`, else the one implied by
    `sliding_window_pattern` (every pattern-th layer full) or the family's default pattern
    (`default_pattern` for families not listed here); None when it declares neither."""
    types = cfg.get("layer_types")
    if types is not None:
        return list(types)
    pattern = (cfg.get("sliding_window_pattern")
               or _DEFAULT_PATTERN.get(cfg.get("model_type"), default_pattern))
    if not pattern:
        return None
    num_layers = int(cfg["num_hidden_layers"])
    return [FULL if (i + 1) % int(pattern) == 0 else SLIDING for i in range(num_layers)]


def layer_sliding_windows(cfg: dict) -> list[int | None]:
    """Per decoder layer: its attention window, or None for full attention."""
    cfg = cfg.get("text_config", cfg)
    num_layers = int(cfg["num_hidden_layers"])
    window = _window(cfg)
    if window is None:
        return [None] * num_layers
    model_type = cfg.get("model_type")
    if model_type == "mistral":
        return [window] * num_layers
    if cfg.get("layer_types") is None and model_type in _QWEN_TYPES:
        first = int(cfg.get("max_window_layers", 0) or 0)
        return [window if i >= first else None for i in range(num_layers)]
    types = declared_layer_types(cfg)
    if types is None:
        return [window] * num_layers
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    return [window if t == SLIDING else None for t in types]


def kv_release_window(cfg: dict) -> int | None:
    """The window after which a request's KV blocks may go back to the pool, or None.

    Only when every layer is windowed: a full-attention layer reads every position, and all
    layers share one block table (one block id holds a token's K/V in every layer), so a
    model with any full-attention layer keeps all its blocks. The largest window decides.
    """
    windows = layer_sliding_windows(cfg)
    if not windows or any(w is None for w in windows):
        return None
    return max(windows)  # type: ignore[type-var]
