"""The serving load generator (benchmarks/serving.py) against a live llmserve server."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location("serving_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_load_generator_counts_every_token_the_server_reports(server, checkpoint, tmp_path,
                                                              endpoint, capsys):
    bench = _load_generator()
    out = tmp_path / "result.json"
    code = bench.main([
        "--base-url", server.base_url, "--model", checkpoint.name, "--tokenizer", str(checkpoint),
        "--endpoint", endpoint, "--num-prompts", "6", "--input-len", "16", "--output-len", "8",
        "--max-concurrency", "3", "--ignore-eos", "--goodput", "ttft:60000",
        "--result-json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    # ignore_eos: every request produces exactly its output length, as usage reports it.
    assert result["total_output_tokens"] == 6 * 8
    assert result["ttft_ms"]["p50"] > 0 and result["e2el_ms"]["p99"] >= result["ttft_ms"]["p99"]
    assert "Output token throughput" in capsys.readouterr().out


def test_load_generator_reports_http_errors_instead_of_hanging(server, checkpoint, tmp_path):
    bench = _load_generator()
    with pytest.raises(SystemExit, match="warm-up request failed: HTTP 404"):
        bench.main(["--base-url", server.base_url, "--model", "no-such-model",
                    "--num-prompts", "2", "--input-len", "4", "--output-len", "2"])
