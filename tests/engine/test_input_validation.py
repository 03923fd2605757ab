"""Bad input raises ValueError with a message a user can act on."""

from __future__ import annotations

import pytest

from llmserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be <= 1"),
        ({"n": 0}, "n must be >= 1"),
        ({"top_k": -3}, "top_k must be >= 0"),
        ({"logprobs": 50}, "logprobs must be <= 20"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens (5) must be <= max_tokens (2)"),
        ({"stop": [""]}, "stop must be a list of non-empty strings"),
    ],
)
def test_bad_sampling_params_raise_value_error(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


def test_empty_prompt_is_rejected(llm):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="non-empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)


def test_pre_tokenized_text_keeps_its_text_and_its_ids_are_still_checked(llm):
    ids = llm.engine.tokenizer.encode("hello world")
    params = SamplingParams(max_tokens=3, temperature=0.0)
    (out,) = llm.generate({"prompt": "hello world", "prompt_token_ids": ids}, params,
                          use_tqdm=False)
    (plain,) = llm.generate("hello world", params, use_tqdm=False)
    assert out.prompt == "hello world" and out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate({"prompt": "", "prompt_token_ids": ids}, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt": "x", "prompt_token_ids": [-1]}, use_tqdm=False)


def test_prompt_plus_max_tokens_over_context_names_the_limit(llm):
    with pytest.raises(ValueError, match="maximum context length is 256 tokens"):
        llm.generate({"prompt_token_ids": [5] * 200}, SamplingParams(max_tokens=100), use_tqdm=False)


def test_token_ids_outside_vocabulary_are_rejected(llm):
    vocab = llm.engine.runner.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, vocab]}, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [-1]}, use_tqdm=False)


def test_request_larger_than_the_pool_is_rejected_at_admission(llama_dir):
    small = LLM(llama_dir, dtype="float32", num_kv_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="whole pool has 4"):
        small.generate({"prompt_token_ids": [5] * 60}, SamplingParams(max_tokens=10), use_tqdm=False)
    # the engine is still usable and holds nothing
    assert small.stats()["kv_blocks_free"] == 4
    out = small.generate({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_a_bad_prompt_in_a_batch_leaves_nothing_queued(llm):
    with pytest.raises(ValueError):
        llm.generate(["hello", ""], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


def test_unknown_architecture_lists_supported_ones(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: .*LlamaForCausalLM") as err:
        LLM(str(tmp_path))
    assert "Gemma3ForCausalLM" in str(err.value)


def test_mismatched_sampling_params_list_is_rejected(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_prompt_filling_the_context_without_max_tokens_is_rejected(llm):
    with pytest.raises(ValueError, match="your prompt has 256 tokens, which leaves no room"):
        llm.generate({"prompt_token_ids": [5] * 256}, SamplingParams(max_tokens=None), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [5] * 250}, SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6  # fills the context exactly
