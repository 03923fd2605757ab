"""Tokenizer for Hugging Face checkpoint directories: encode, decode, token bytes, chat templates.

Chat-message checks live in ``llmserve.chat_messages`` and incremental detokenizing in
``llmserve.detokenizer``; both are re-exported here. Only files inside the model directory are read (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``, ``generation_config.json``); no remote code is ever run.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from llmserve.chat_messages import VALID_ROLES, validate_messages
from llmserve.detokenizer import IncrementalDetokenizer

__all__ = ["VALID_ROLES", "IncrementalDetokenizer", "Tokenizer", "validate_messages"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder_table() -> dict[str, int]:
    """Inverse of the byte-level alphabet: printable Latin-1 bytes stand for themselves and the
    rest (controls, space, 0x7f-0xa0, 0xad) are shifted to code points 256 and up, in order."""
    table: dict[str, int] = {}
    shifted = 0
    for b in range(256):
        if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_LEVEL = _byte_level_decoder_table()


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _find_chat_template(model_dir: pathlib.Path, tok_config: dict[str, Any]) -> str | None:
    """The default chat template, from the places transformers 4 and 5 save it."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if template is None:
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _load_backend(model_dir: pathlib.Path) -> _HFTokenizer:
    path = model_dir / "tokenizer.json"
    if path.is_file():
        try:
            return _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises its own exception type
            raise ValueError(f"cannot parse {path}: {exc}") from exc
    # No tokenizer.json: let transformers convert slow-tokenizer files (vocab.json + merges.txt,
    # tokenizer.model), from this directory only and without remote code.
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True,
                                           trust_remote_code=False)
        return hf.backend_tokenizer
    except Exception as exc:
        raise ValueError(
            f"no usable tokenizer in {model_dir}: expected tokenizer.json "
            f"(or files transformers can convert to it)"
        ) from exc


class Tokenizer:
    """Encode/decode text for one model; see docs/engine_api.md for the contract."""

    def __init__(self, backend: _HFTokenizer, tok_config: dict[str, Any],
                 chat_template: str | None, extra_eos_ids: Iterable[int] = ()) -> None:
        self._tok = backend
        self._config = tok_config
        self.chat_template = chat_template
        vocab = backend.get_vocab(with_added_tokens=True)
        # Largest id + 1, not the count: encodings such as cl100k leave gaps between ids.
        self.vocab_size: int = max(vocab.values(), default=-1) + 1
        added = backend.get_added_tokens_decoder()
        self._added_ids = frozenset(added)
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self.bos_token_id = self._id_of(_token_text(tok_config.get("bos_token")))
        self.pad_token_id = self._id_of(_token_text(tok_config.get("pad_token")))
        eos = self._id_of(_token_text(tok_config.get("eos_token")))
        self.eos_token_ids: frozenset[int] = frozenset(
            ([eos] if eos is not None else []) + list(extra_eos_ids))
        decoder = backend.decoder
        self._byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()
        self._token_text_cache: dict[int, str] = {}
        self._token_bytes_cache: dict[int, bytes] = {}
        self._hf_chat: Any = None

    @classmethod
    def from_pretrained(cls, model_dir: str | pathlib.Path) -> Tokenizer:
        """Load from a local checkpoint directory (never downloads, never runs remote code)."""
        root = pathlib.Path(model_dir)
        if not root.is_dir():
            raise ValueError(f"model directory {str(model_dir)!r} does not exist")
        tok_config = _read_json(root / "tokenizer_config.json")
        gen = _read_json(root / "generation_config.json")
        eos = gen.get("eos_token_id")
        if eos is None:  # older checkpoints carry it only in config.json
            eos = _read_json(root / "config.json").get("eos_token_id")
        return cls(_load_backend(root), tok_config, _find_chat_template(root, tok_config),
                   _as_id_list(eos))

    def _id_of(self, token: str | None) -> int | None:
        return self._tok.token_to_id(token) if token is not None else None

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of added tokens marked special (dropped by ``skip_special_tokens``)."""
        return self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry or added token, or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token text in it becomes the special token."""
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids the tokenizer does not know (vocab padding) decode to nothing."""
        try:
            return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as exc:
            raise ValueError(f"token ids must be non-negative integers: {exc}") from exc

    def token_bytes(self, token_id: int) -> bytes:
        """Raw UTF-8 bytes of one token (OpenAI's logprob ``bytes``); empty for unknown ids."""
        cached = self._token_bytes_cache.get(token_id)
        if cached is None:
            cached = self._token_bytes_cache[token_id] = self._compute_token_bytes(token_id)
        return cached

    def _compute_token_bytes(self, token_id: int) -> bytes:
        if not isinstance(token_id, int) or not 0 <= token_id < 1 << 32:
            raise ValueError(f"token id must be a non-negative integer, got {token_id!r}")
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id not in self._added_ids:
            if self._byte_level and all(ch in _BYTE_LEVEL for ch in piece):
                return bytes(_BYTE_LEVEL[ch] for ch in piece)
            match = _BYTE_FALLBACK.match(piece)
            if match:  # SentencePiece byte fallback
                return bytes([int(match.group(1), 16)])
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def decode_token(self, token_id: int) -> str:
        """Text of one token for logprob displays.

        Tokens whose bytes are not valid UTF-8 on their own (part of a multi-byte character) are
        shown the way OpenAI shows them: ``"bytes:\\xe2\\x80"``. Unknown ids give ``""``.
        """
        cached = self._token_text_cache.get(token_id)
        if cached is None:
            raw = self.token_bytes(token_id)
            try:
                cached = raw.decode("utf-8")
            except UnicodeDecodeError:
                cached = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._token_text_cache[token_id] = cached
        return cached

    @property
    def chat_template_hash(self) -> str | None:
        """sha256 hex digest of the chat template, or None when the model has none."""
        if self.chat_template is None:
            return None
        return hashlib.sha256(self.chat_template.encode("utf-8")).hexdigest()

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the model's jinja chat template (as transformers does).

        Text parts in list content are joined with newlines first. Encode the result with
        ``add_special_tokens=False``: templates write their own BOS. Extra keyword arguments
        (``tools``, ``documents``, template variables) go to the template.
        """
        if self.chat_template is None:
            raise ValueError("model has no chat template; use a completion request, or a model "
                             "whose tokenizer_config.json has a chat_template")
        normalized = validate_messages(messages)
        if self._hf_chat is None:
            from tokenizers.models import BPE
            from transformers import PreTrainedTokenizerFast

            # Special-token values the templates read (bos_token, eos_token ...).
            specials = {k: _token_text(self._config.get(k)) for k in
                        ("bos_token", "eos_token", "pad_token", "unk_token")}
            # Rendering to text never touches the vocabulary, so transformers gets an empty
            # tokenizer: cheap to build, and nothing it sets can change our encoding.
            self._hf_chat = PreTrainedTokenizerFast(
                tokenizer_object=_HFTokenizer(BPE()), **{k: v for k, v in specials.items() if v})
        try:
            rendered = self._hf_chat.apply_chat_template(
                normalized, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as exc:  # jinja errors, raise_exception() in templates
            raise ValueError(f"chat template failed: {exc}") from exc
        if not isinstance(rendered, str):
            raise ValueError("chat template did not render to text")
        return rendered
