"""A model version: a content hash of a checkpoint, cheap enough to compute at every load.

The hash covers:

- ``config.json``, canonicalised (keys sorted, no whitespace) so that reformatting the file does
  not change the version;
- for every ``*.safetensors`` file (sorted by name): its name and its JSON header, which holds
  each tensor's name, dtype, shape and byte offsets;
- a small sample of every tensor's bytes (its first ``SAMPLE_BYTES``), because a fine-tune keeps
  the exact header of its base model and would otherwise get the same version.

It never reads whole weights: a 70B checkpoint costs a few hundred small reads.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SAMPLE_BYTES = 1024
# A safetensors header is JSON of a few hundred KB at most; a larger length is a corrupt file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
VERSION_CHARS = 16


def compute_model_version(model_dir: str | Path) -> str:
    """Return a short hex content hash of the checkpoint in ``model_dir``.

    Raises:
        ValueError: the directory has no config.json, or a safetensors file is malformed.
    """
    root = Path(model_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ValueError(f"cannot compute a model version: no config.json in {str(root)!r}")
    digest = hashlib.sha256()
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    digest.update(b"config.json\0")
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for path in sorted(root.glob("*.safetensors")):
        digest.update(b"\0" + path.name.encode() + b"\0")
        _hash_safetensors(path, digest)
    return digest.hexdigest()[:VERSION_CHARS]


def _hash_safetensors(path: Path, digest: hashlib._Hash) -> None:
    """Feed one safetensors file's header and per-tensor byte samples into ``digest``."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path} is not a safetensors file (header length {header_len})")
        header_bytes = fh.read(header_len)
        digest.update(header_bytes)
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} has a safetensors header that is not JSON") from None
        data_start = 8 + header_len
        for name in sorted(k for k in header if k != "__metadata__"):
            offsets = header[name].get("data_offsets") if isinstance(header[name], dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2):
                raise ValueError(f"{path}: tensor {name!r} has no valid data_offsets")
            begin, end = int(offsets[0]), int(offsets[1])
            fh.seek(data_start + begin)
            digest.update(fh.read(max(0, min(SAMPLE_BYTES, end - begin))))
