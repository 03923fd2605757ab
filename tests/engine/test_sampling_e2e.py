"""Sampling semantics through the whole engine: seeds, top_k=1, stops, min_tokens, logprobs, n."""

from __future__ import annotations

import pytest

from llmserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", num_kv_blocks=256)


PROMPT = {"prompt_token_ids": [11, 42, 97, 5, 230, 18, 77]}


def gen(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def test_seeded_request_is_reproducible_whatever_its_batch_mates(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = gen(llm, [PROMPT], params)[0].outputs[0].token_ids
    mates = [{"prompt_token_ids": [i + 3] * (i + 2)} for i in range(5)]
    noisy = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    crowded = gen(llm, mates[:2] + [PROMPT] + mates[2:], [noisy, noisy, params, noisy, noisy, noisy])
    assert crowded[2].outputs[0].token_ids == alone
    other_seed = gen(llm, [PROMPT], SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_top_k_one_equals_greedy(llm):
    greedy = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    top1 = gen(llm, [PROMPT], SamplingParams(temperature=1.3, top_k=1, max_tokens=10, ignore_eos=True))
    assert top1[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_stop_token_ends_the_completion_and_is_kept_in_token_ids(llm):
    greedy = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_at = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_at)
    out = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at], ignore_eos=True))[0].outputs[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_stop_string_is_trimmed_from_the_text(llm):
    greedy = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    text = greedy.text
    stop = text[5:8]
    assert stop and stop.strip(), text
    out = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop], ignore_eos=True,
                                             include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_min_tokens_blocks_stop_tokens_until_reached(llm):
    greedy = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_at = greedy.token_ids[0]  # would stop at once
    out = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=6,
                                            stop_token_ids=[stop_at], ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) >= 6
    assert stop_at not in out.token_ids[:6]


def test_max_tokens_finishes_with_length(llm):
    out = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_logprobs_return_the_chosen_token_and_top_k(llm):
    out = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert 3 <= len(entry) <= 4
        assert all(isinstance(lp.decoded_token, str) for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_n_completions_are_distinct_and_indexed(llm):
    out = gen(llm, [PROMPT], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_penalties_change_the_output(llm):
    base = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = gen(llm, [PROMPT], base)[0].outputs[0].token_ids
    penalised = gen(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                  repetition_penalty=5.0, frequency_penalty=2.0))[0].outputs[0].token_ids
    assert penalised != plain
    # a strong frequency penalty makes greedy avoid repeating any output token
    assert len(set(penalised)) >= len(set(plain))


def test_chat_applies_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hello there"}], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    expected = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert out.prompt_token_ids == expected
    assert len(out.outputs[0].token_ids) >= 1
