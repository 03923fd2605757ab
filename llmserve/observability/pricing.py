"""Pricing files: what a model's tokens cost, by list price or by the hardware they ran on.

A pricing file is TOML or YAML with one table per served model name (``"*"`` is the fallback)::

    [models.my-llama]
    mode = "list"                 # $ per 1M tokens
    input_per_1m = 0.50
    cached_input_per_1m = 0.125   # optional; defaults to input_per_1m
    output_per_1m = 1.50

    [models."*"]
    mode = "hardware"             # $ per hour of the machine, attributed from step timings
    usd_per_hour = 3.20
    prefill_token_weight = 1.0    # optional, see llmserve.observability.cost
    decode_token_weight = 1.0

Unknown keys, unknown modes and negative prices are rejected with a ValueError.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MODES = ("list", "hardware")
_LIST_KEYS = {"mode", "input_per_1m", "cached_input_per_1m", "output_per_1m"}
_HW_KEYS = {"mode", "usd_per_hour", "prefill_token_weight", "decode_token_weight"}
FALLBACK = "*"


@dataclass(frozen=True)
class CostBreakdown:
    """A request's cost in USD, split by what it paid for (cached input is part of input)."""

    input_usd: float = 0.0
    cached_input_usd: float = 0.0
    output_usd: float = 0.0

    @property
    def total_usd(self) -> float:
        return self.input_usd + self.output_usd


@dataclass(frozen=True)
class ListPrice:
    """$ per 1M tokens: uncached input, cached input and output."""

    input_per_1m: float
    output_per_1m: float
    cached_input_per_1m: float | None = None
    mode: str = "list"

    def cost(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> CostBreakdown:
        """Cost of ``input_tokens`` prompt tokens of which ``cached_tokens`` hit the cache."""
        cached = max(0, min(cached_tokens, input_tokens))
        cached_rate = self.input_per_1m if self.cached_input_per_1m is None else self.cached_input_per_1m
        cached_usd = cached * cached_rate / 1e6
        uncached_usd = (input_tokens - cached) * self.input_per_1m / 1e6
        return CostBreakdown(
            input_usd=uncached_usd + cached_usd,
            cached_input_usd=cached_usd,
            output_usd=output_tokens * self.output_per_1m / 1e6,
        )


@dataclass(frozen=True)
class HardwarePrice:
    """$ per hour of the machine, plus the token weights used to split a step's time."""

    usd_per_hour: float
    prefill_token_weight: float = 1.0
    decode_token_weight: float = 1.0
    mode: str = "hardware"

    @property
    def usd_per_second(self) -> float:
        return self.usd_per_hour / 3600.0


ModelPrice = ListPrice | HardwarePrice


@dataclass(frozen=True)
class PricingTable:
    """Prices by served model name, with an optional ``"*"`` fallback."""

    models: dict[str, ModelPrice]
    source: str = ""

    def for_model(self, model: str) -> ModelPrice | None:
        """The price of ``model``: its own entry, else the fallback, else None (not priced)."""
        return self.models.get(model) or self.models.get(FALLBACK)


def _number(entry: dict[str, Any], key: str, where: str, default: float | None = None) -> float | None:
    value = entry.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: {key} must not be negative, got {value}")
    return float(value)


def _required(entry: dict[str, Any], key: str, where: str) -> float:
    if key not in entry:
        raise ValueError(f"{where}: missing {key}")
    return _number(entry, key, where)  # type: ignore[return-value]


def parse_model_price(entry: Any, where: str) -> ModelPrice:
    """Validate one model's table and build its price."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table of prices, got {type(entry).__name__}")
    mode = entry.get("mode", "list")
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    allowed = _LIST_KEYS if mode == "list" else _HW_KEYS
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} for mode {mode!r}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    if mode == "list":
        return ListPrice(
            input_per_1m=_required(entry, "input_per_1m", where),
            output_per_1m=_required(entry, "output_per_1m", where),
            cached_input_per_1m=_number(entry, "cached_input_per_1m", where),
        )
    price = HardwarePrice(
        usd_per_hour=_required(entry, "usd_per_hour", where),
        prefill_token_weight=_number(entry, "prefill_token_weight", where, 1.0),  # type: ignore[arg-type]
        decode_token_weight=_number(entry, "decode_token_weight", where, 1.0),  # type: ignore[arg-type]
    )
    if price.prefill_token_weight + price.decode_token_weight <= 0:
        raise ValueError(f"{where}: prefill_token_weight and decode_token_weight cannot both be 0")
    return price


def parse_pricing(data: Any, source: str = "pricing") -> PricingTable:
    """Build a PricingTable from an already-parsed TOML/YAML document."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ValueError(f"{source}: expected a top-level 'models' table keyed by model name")
    extra = sorted(set(data) - {"models", "currency"})
    if extra:
        raise ValueError(f"{source}: unknown top-level key(s) {', '.join(extra)}")
    if data.get("currency", "USD") != "USD":
        raise ValueError(f"{source}: only currency = \"USD\" is supported")
    models = {
        str(name): parse_model_price(entry, f"{source}: models.{name}")
        for name, entry in data["models"].items()
    }
    if not models:
        raise ValueError(f"{source}: the 'models' table is empty")
    return PricingTable(models=models, source=source)


def load_pricing(path: str | Path) -> PricingTable:
    """Read a ``.toml``, ``.yaml`` or ``.yml`` pricing file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"pricing file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ValueError(f"pricing file {str(p)!r}: use a .toml, .yaml or .yml file")
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"pricing file {str(p)!r} is not valid TOML: {exc}") from None
    except Exception as exc:  # yaml.YAMLError without importing yaml at module load
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"pricing file {str(p)!r} is not valid YAML: {exc}") from None
    return parse_pricing(data, source=str(p))
