"""Pricing files in TOML and YAML: both modes, the fallback entry, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.observability.pricing import HardwarePrice, ListPrice, load_pricing

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pricing.toml"


def test_toml_pricing_reads_list_and_hardware_modes(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        '[models.small]\nmode = "list"\ninput_per_1m = 0.5\noutput_per_1m = 1.5\n'
        'cached_input_per_1m = 0.1\n\n[models."*"]\nmode = "hardware"\nusd_per_hour = 3.2\n'
        'decode_token_weight = 2\n')
    table = load_pricing(path)
    assert table.for_model("small") == ListPrice(0.5, 1.5, 0.1)
    fallback = table.for_model("anything-else")
    assert isinstance(fallback, HardwarePrice)
    assert fallback.usd_per_hour == 3.2 and fallback.decode_token_weight == 2.0
    assert fallback.prefill_token_weight == 1.0


def test_yaml_pricing_matches_toml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("models:\n  small:\n    mode: list\n    input_per_1m: 0.5\n    output_per_1m: 1.5\n")
    table = load_pricing(path)
    assert table.for_model("small") == ListPrice(0.5, 1.5, None)
    assert table.for_model("other") is None  # no fallback: not priced


def test_example_pricing_file_is_valid():
    table = load_pricing(EXAMPLE)
    assert table.models


@pytest.mark.parametrize("body, message", [
    ('[models.m]\nmode = "list"\ninput_per_1m = -1\noutput_per_1m = 1\n', "must not be negative"),
    ('[models.m]\nmode = "list"\ninput_per_1m = 1\n', "missing output_per_1m"),
    ('[models.m]\nmode = "rental"\n', "mode must be one of"),
    ('[models.m]\nmode = "hardware"\nusd_per_hour = 1\ninput_per_1m = 2\n', "unknown key"),
    ('[models.m]\nmode = "list"\ninput_per_1m = "cheap"\noutput_per_1m = 1\n', "must be a number"),
    ('[prices.m]\n', "top-level 'models'"),
    ('models = [\n', "not valid TOML"),
])
def test_bad_pricing_files_raise_a_clear_value_error(tmp_path, body, message):
    path = tmp_path / "p.toml"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_pricing(path)


def test_missing_or_unsupported_pricing_file_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_pricing(tmp_path / "nope.toml")
    other = tmp_path / "p.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match="toml"):
        load_pricing(other)
