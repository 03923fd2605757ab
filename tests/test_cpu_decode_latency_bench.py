"""benchmarks/cpu_decode_latency.py at a tiny size, with a stand-in for the llama.cpp peer: the
rounds interleave, the ratios and the token agreement come out as the JSON says."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_decode_latency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cpu_decode_latency_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class StandInPeer:
    """Answers like the llama.cpp worker, with llmserve's own tokens (recorded by the test) for
    the single stream, and the same tokens changed from the third one on for the streams."""

    expected: dict[tuple[int, ...], list[int]] = {}

    def __init__(self, checkpoint, threads, n_seq_max, n_ctx):
        self.info = {"settings": {"threads": threads, "n_seq_max": n_seq_max, "n_ctx": n_ctx}}
        self.idle_cpu_s = 0.0
        self.closed = False
        StandInPeer.last = self

    def run(self, prompts, new_tokens):
        out = []
        for p in prompts:
            tokens = list(self.expected[tuple(p)])
            if len(prompts) > 1:
                tokens[2:] = [(t + 1) % 512 for t in tokens[2:]]
            out.append(tokens)
        return {"elapsed_s": 0.5, "first_token_s": 0.1, "decode_s": 0.3, "cpu_s": 1.0,
                "decode_cpu_s": 0.6, "token_ids": out}

    def close(self):
        self.closed = True


def test_common_prefix_and_unknown_peers(bench):
    assert bench.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert bench.common_prefix([1, 2], [1, 2, 3]) == 2
    assert bench.peer_engines(bench.parse_args(["--peers", "llama.cpp"])) == ["llama.cpp"]
    with pytest.raises(SystemExit, match="unknown peer"):
        bench.peer_engines(bench.parse_args(["--peers", "llama.cpp,ollama"]))


def test_a_tiny_run_with_a_peer_reports_ratios_and_agreement(bench, monkeypatch, tmp_path):
    from llmserve import LLM, SamplingParams
    from llmserve.models.random_checkpoint import build_random_checkpoint

    path = str(build_random_checkpoint(
        tmp_path / "ckpt", "qwen3", seed=0, dtype="float32", hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=512, max_position_embeddings=128))
    args = bench.parse_args(["--model", path, "--rounds", "2", "--prompt-len", "8", "--new-tokens",
                             "6", "--streams", "2", "--skip-startup",
                             "--peers", "llama.cpp"])
    batch = bench.prompts(1, 8, 512, seed=1) + bench.prompts(2, 8, 512, seed=2)  # as measure's
    outs = LLM(path, dtype="float32").generate(
        [{"prompt_token_ids": p} for p in batch],
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)
    StandInPeer.expected = {tuple(p): o.outputs[0].token_ids for p, o in zip(batch, outs)}
    monkeypatch.setitem(sys.modules, "peers.llama_cpp_engine",
                        types.SimpleNamespace(LlamaCppPeer=StandInPeer))

    summary = bench.summarize(bench.measure(args, path), None, args)

    assert StandInPeer.last.closed
    assert set(summary["all"]) == {"eager", "fused", "llama.cpp"}
    assert summary["all"]["llama.cpp"]["ms_per_token"] == [pytest.approx(1e3 * 0.3 / 5)] * 2
    assert summary["all"]["llama.cpp"]["tok_s"] == [pytest.approx(12 / 0.5)] * 2
    ratios = summary["vs_peers"]["llama.cpp"]
    assert len(ratios["single_ms_ratio_per_round"]) == 2
    assert ratios["single_ms_ratio_peer_over_fused"] == pytest.approx(
        60.0 / summary["median"]["fused"]["ms_per_token"])
    # The single prompt agrees whole, the two streams part after two tokens.
    assert summary["peers"]["llama.cpp"]["tokens"] == {
        "identical_sequences": 1, "sequences": 3, "min_common_prefix": 2, "median_common_prefix": 2}
