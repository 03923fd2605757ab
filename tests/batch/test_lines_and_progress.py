"""Batch input validation (line numbers, duplicates) and the durable result log."""

from __future__ import annotations

import json

import pytest
from batch_helpers import chat_line, completion_line, read_jsonl, write_jsonl

from llmserve.batch.lines import BatchInputError, parse_lines, read_batch_file
from llmserve.batch.progress import ResultLog
from llmserve.commands.batch import check_paths


def test_every_structural_error_is_reported_with_its_line_number(tmp_path):
    rows = [
        chat_line("a", "hi"),
        "{not json",
        {"method": "POST", "url": "/v1/completions", "body": {}},  # no custom_id
        {**chat_line("b", "x"), "url": "/v1/embeddings"},
        {**chat_line("c", "x"), "method": "GET"},
        {**chat_line("d", "x"), "body": "text"},
        chat_line("a", "again"),  # duplicate of line 1
        "[1, 2]",
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(BatchInputError) as info:
        read_batch_file(path)
    errors = {e.line: e for e in info.value.errors}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8]
    assert errors[2].code == "invalid_json"
    assert errors[3].param == "custom_id"
    assert errors[4].code == "invalid_url"
    assert errors[5].code == "invalid_method"
    assert errors[6].param == "body"
    assert errors[7].code == "duplicate_custom_id" and "first on line 1" in errors[7].message
    assert "line 2:" in str(info.value) and "line 7:" in str(info.value)


def test_blank_lines_are_skipped_and_line_numbers_count_them():
    lines = parse_lines([json.dumps(chat_line("a", "x")), "", "  ",
                         json.dumps(completion_line("b", "y"))])
    assert [(line.line, line.custom_id) for line in lines] == [(1, "a"), (4, "b")]


def test_a_file_without_requests_is_rejected():
    with pytest.raises(BatchInputError, match="no requests"):
        parse_lines(["", ""])


def test_lines_must_match_the_batch_endpoint():
    with pytest.raises(BatchInputError, match="does not match the batch endpoint"):
        parse_lines([json.dumps(chat_line("a", "x"))], endpoint="/v1/completions")


def test_output_or_errors_equal_to_input_is_rejected(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [chat_line("a", "x")])
    with pytest.raises(ValueError, match="--output .* is the input file"):
        check_paths(str(src), str(tmp_path / "." / "in.jsonl"), None)
    with pytest.raises(ValueError, match="--errors"):
        check_paths(str(src), str(tmp_path / "out.jsonl"), str(src))
    check_paths(str(src), str(tmp_path / "out.jsonl"), str(tmp_path / "err.jsonl"))


def _ok(custom_id: str) -> dict:
    return {"id": "x", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": "r", "body": {}}, "error": None}


def test_result_log_cuts_a_torn_last_line_and_remembers_finished_ids(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(_ok("a")) + "\n" + json.dumps(_ok("b")) + "\n"
                   + json.dumps(_ok("c"))[:20], encoding="utf-8")
    with ResultLog(out) as log:
        assert log.done == {"a", "b"}
        log.write(_ok("c"))
    assert [r["custom_id"] for r in read_jsonl(out)] == ["a", "b", "c"]


def test_result_log_routes_failures_to_the_errors_file(tmp_path):
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    failed = {**_ok("b"), "response": {"status_code": 400, "request_id": "r", "body": {}}}
    with ResultLog(out, err) as log:
        log.write(_ok("a"))
        log.write(failed)
        assert (log.counts["completed"], log.counts["failed"]) == (1, 1)
    assert [r["custom_id"] for r in read_jsonl(out)] == ["a"]
    assert [r["custom_id"] for r in read_jsonl(err)] == ["b"]
    with ResultLog(out, err) as log:  # a resumed run sees both files' ids as done
        assert log.done == {"a", "b"}
        assert (log.counts["completed"], log.counts["failed"]) == (1, 1)
