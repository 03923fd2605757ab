"""The offline `LLM` builds finished outputs only, and text is folded in lazily for requests
without stop strings: the results must equal what a step-by-step reader of every output gets."""

from __future__ import annotations

import pytest

from llmserve import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": [11, 42, 97, 5, 230, 18, 77]},
           {"prompt_token_ids": [3, 9, 27, 81]},
           {"prompt_token_ids": [200, 201, 202, 7, 7, 7, 1, 19]}]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", num_kv_blocks=256)


def params_for(llm) -> list[SamplingParams]:
    """No stops, a stop string, a stop token, and n=2 with logprobs: each path of the
    output processor."""
    free = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    greedy = llm.generate(PROMPTS[:2], free, use_tqdm=False)
    text, tokens = greedy[0].outputs[0].text, greedy[1].outputs[0].token_ids
    assert text[4:7].strip(), text
    return [SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, stop=[text[4:7]]),
            SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True,
                           stop_token_ids=[tokens[5]]),
            SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=9, logprobs=2,
                           ignore_eos=True)]


def stepwise(engine, params) -> tuple[dict, dict]:
    """Run the prompts with every step's outputs read (as a streaming server does): the last
    output of each request, and every partial text seen."""
    last, partial = {}, {}
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(f"s{i}", prompt, p)
    while engine.has_unfinished_requests():
        for out in engine.step():
            last[out.request_id] = out
            partial.setdefault(out.request_id, []).append([c.text for c in out.outputs])
    return last, partial


def summary(out):
    return [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs)
            for c in out.outputs]


def test_offline_results_equal_the_step_by_step_ones(llm):
    params = params_for(llm)
    offline = llm.generate(PROMPTS, params, use_tqdm=False)
    last, partial = stepwise(llm.engine, params)
    for i, out in enumerate(offline):
        assert out.finished and last[f"s{i}"].finished
        assert summary(out) == summary(last[f"s{i}"])
        # Every partial text the streaming reader saw is a prefix of the final one.
        for texts in partial[f"s{i}"]:
            for text, c in zip(texts, out.outputs):
                assert c.text.startswith(text) or c.finish_reason == "stop"
    assert offline[0].outputs[0].finish_reason == "stop"
    assert offline[0].outputs[0].stop_reason == params[0].stop[0]
    assert offline[1].outputs[0].stop_reason == params[1].stop_token_ids[0]


def test_offline_steps_build_only_finished_outputs(llm, monkeypatch):
    engine = llm.engine
    step, seen = engine.step, []

    def spy():
        outs = step()
        seen.extend(outs)
        return outs

    monkeypatch.setattr(engine, "step", spy)
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    results = llm.generate(PROMPTS, free, use_tqdm=False)
    assert len(seen) == len(PROMPTS) and all(out.finished for out in seen)
    assert all(len(r.outputs[0].token_ids) == 12 and r.outputs[0].text for r in results)
    assert engine.outputs.finished_only is False  # only while `generate` runs


def test_the_switch_is_reset_when_generate_fails(llm, monkeypatch):
    def broken():
        raise RuntimeError("step failed")

    monkeypatch.setattr(llm.engine, "step", broken)
    with pytest.raises(RuntimeError, match="step failed"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine.outputs.finished_only is False
    monkeypatch.undo()
    llm.engine.abort_request([rid for rid in list(llm.engine.outputs.groups)])
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
