"""compute_model_version: stable for one checkpoint, different when config or weights differ."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from llmserve.models.version import compute_model_version


def _checkpoint(path, seed=0, config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"hidden_size": 8, "vocab_size": 16}))
    gen = torch.Generator().manual_seed(seed)
    save_file({"a.weight": torch.randn(4, 8, generator=gen), "b.weight": torch.randn(8, generator=gen)},
              str(path / "model.safetensors"))
    return path


def test_same_checkpoint_gives_the_same_version_even_when_copied(tmp_path):
    a = _checkpoint(tmp_path / "a")
    shutil.copytree(a, tmp_path / "copy")
    version = compute_model_version(a)
    assert version == compute_model_version(tmp_path / "copy")
    assert len(version) == 16 and int(version, 16) >= 0


def test_reformatted_config_keeps_the_version(tmp_path):
    a = _checkpoint(tmp_path / "a")
    before = compute_model_version(a)
    cfg = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps(cfg, indent=4))
    assert compute_model_version(a) == before


def test_changed_config_or_retrained_weights_change_the_version(tmp_path):
    base = compute_model_version(_checkpoint(tmp_path / "a"))
    assert compute_model_version(_checkpoint(tmp_path / "b", seed=1)) != base
    other_cfg = {"hidden_size": 8, "vocab_size": 16, "rope_theta": 1e6}
    assert compute_model_version(_checkpoint(tmp_path / "c", config=other_cfg)) != base


def test_missing_config_or_corrupt_safetensors_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        compute_model_version(tmp_path)
    bad = _checkpoint(tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        compute_model_version(bad)
