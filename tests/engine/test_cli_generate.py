"""`llmserve generate` end to end (in-process)."""

from __future__ import annotations

import json

from llmserve.cli import main


def test_generate_prints_completions_as_json(llama_dir, capsys):
    rc = main(["generate", "--model", llama_dir, "--max-tokens", "5", "--num-kv-blocks", "64", "--json", "hello world", "good day"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines] == ["hello world", "good day"]
    assert all(len(line["token_ids"]) <= 5 and line["finish_reason"] in ("stop", "length") for line in lines)


def test_generate_reports_bad_input_as_an_error_exit(llama_dir, capsys):
    rc = main(["generate", "--model", llama_dir, "--max-tokens", "0", "hi"])
    assert rc == 2
    assert "max_tokens must be >= 1" in capsys.readouterr().err


def test_bench_command_finds_the_benchmark_scripts(capsys):
    from llmserve.commands.bench import BENCHMARKS, benchmark_path

    for name in BENCHMARKS:
        assert benchmark_path(name).is_file()
    assert main(["bench", "throughput", "--help"]) == 0
    assert "--num-prompts" in capsys.readouterr().out
