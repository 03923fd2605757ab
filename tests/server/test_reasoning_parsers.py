"""Reasoning parsers: `<think>` splitting, whole and streamed, for any chunking."""

from __future__ import annotations

import random

import pytest

from llmserve.server.openai.reasoning import THINK_END, get_reasoning_parser


def run_stream(parser, chunks: list[str]) -> tuple[str | None, str | None]:
    stream = parser.stream()
    reasoning = content = ""
    for chunk in chunks:
        r, c = stream.feed(chunk)
        reasoning, content = reasoning + r, content + c
    r, c = stream.finish()
    return (reasoning + r) or None, (content + c) or None


def check_all_splits(parser, text: str) -> tuple[str | None, str | None]:
    expected = parser.extract(text)
    splits = [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]
    rng = random.Random(1)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(4, len(text) - 1)))
        splits.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    for chunks in splits:
        assert run_stream(parser, chunks) == expected, chunks
    return expected


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1"])
def test_think_block_then_answer(name):
    text = "<think>\nLet me think: a < b </thin k>.\n</think>\n\nThe answer is 4."
    assert check_all_splits(get_reasoning_parser(name)(), text) == (
        "\nLet me think: a < b </thin k>.\n", "The answer is 4.")


def test_qwen3_without_think_is_all_content():
    p = get_reasoning_parser("qwen3")()
    assert check_all_splits(p, "Plain answer </think> stays") == (
        None, "Plain answer </think> stays")
    assert check_all_splits(p, "  <thinking is not a tag") == (None, "  <thinking is not a tag")


def test_deepseek_r1_starts_inside_reasoning():
    p = get_reasoning_parser("deepseek_r1")()
    assert check_all_splits(p, "Hmm, 2+2.</think>4") == ("Hmm, 2+2.", "4")
    # cut off before the reasoning ended: all of it is reasoning
    assert check_all_splits(p, "still thinking </thi") == ("still thinking </thi", None)
    qwen_flagged = get_reasoning_parser("qwen3")(starts_in_reasoning=True)
    assert check_all_splits(qwen_flagged, "x</think>y") == ("x", "y")


def test_empty_reasoning_and_held_partial_tags():
    p = get_reasoning_parser("qwen3")()
    assert check_all_splits(p, "<think>\n\n</think>\n\nHi") == ("\n\n", "Hi")
    stream = p.stream()
    assert stream.feed("<thi") == ("", "")
    assert stream.feed("nk>abc</th") == ("abc", "")
    assert not stream.reasoning_ended
    assert stream.feed("ink>\n") == ("", "")
    assert stream.reasoning_ended
    assert stream.feed("ok") == ("", "ok")
    assert stream.finish() == ("", "")


def test_parser_for_a_rendered_prompt():
    qwen3 = get_reasoning_parser("qwen3")
    opened = qwen3.for_prompt("<|im_start|>assistant\n<think>\n")
    assert opened.starts_in_reasoning and opened.constraint_after_reasoning
    assert opened.extract("hmm</think>\n\nyes") == ("hmm", "yes")
    closed = qwen3.for_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not closed.starts_in_reasoning and not closed.constraint_after_reasoning
    assert closed.extract("yes") == (None, "yes")
    plain = qwen3.for_prompt("<|im_start|>assistant\n")
    assert not plain.starts_in_reasoning and plain.constraint_after_reasoning
    assert get_reasoning_parser("deepseek_r1").for_prompt(None).starts_in_reasoning


def test_registry_and_end_marker():
    assert get_reasoning_parser("qwen3").end_marker == THINK_END == "</think>"
    with pytest.raises(ValueError, match="deepseek_r1"):
        get_reasoning_parser("granite")
