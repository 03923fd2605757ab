"""benchmarks/host_overhead.py at a tiny size: it runs on today's engine and its JSON holds up."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
from types import SimpleNamespace

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("host_overhead_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(bench, tmp_path_factory) -> str:
    from llmserve.models.random_checkpoint import build_random_checkpoint

    return str(build_random_checkpoint(tmp_path_factory.mktemp("host-overhead"), **bench.CHECKPOINT))


def _run(bench, model_dir: str, tmp_path: pathlib.Path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    code = bench.main(["--model", model_dir, "--steps", "3", "--warmup", "1",
                       "--prompt-len-range", "20", "60", "--json", str(out), *extra])
    assert code == 0
    return json.loads(out.read_text())


def test_every_phase_is_timed_and_the_phases_add_up_to_the_step(bench, model_dir, tmp_path):
    report = _run(bench, model_dir, tmp_path, "--batch-sizes", "1", "10")
    assert report["hardware"]["nproc"] >= 1 and report["date"]
    assert [r["batch_size"] for r in report["results"]] == [1, 10]
    names = [p.name for p in bench.PHASES]
    for result in report["results"]:
        assert result["steps"] == 3
        for clock in (result, result["cpu"]):  # wall time, and this thread's CPU time
            assert list(clock["phases"]) == names
            for phase in clock["phases"].values():
                assert phase["mean_us"] > 0 and phase["median_us"] > 0
                assert phase["critical"] is True  # without async scheduling the step is sequential
            mean_sum = sum(p["mean_us"] for p in clock["phases"].values())
            total = clock["step_total_us"]["mean_us"]
            # Exclusive times: nothing counted twice, nothing of the step left out.
            assert 0.8 * total <= mean_sum <= total * 1.001
            assert clock["critical_path_us"]["mean_us"] == pytest.approx(mean_sum)


def test_with_async_scheduling_the_output_work_leaves_the_critical_path(bench, model_dir,
                                                                        tmp_path):
    report = _run(bench, model_dir, tmp_path, "--batch-sizes", "4",
                  "--engine-arg", "async_scheduling=true")
    result = report["results"][0]
    assert result["async_scheduling"] is True
    off_path = {n for n, p in result["phases"].items() if not p["critical"]}
    assert off_path == {"read tokens", "update", "output"}
    assert result["phases"]["output"]["mean_us"] > 0
    host = result["critical_path_host_us"]["mean_us"]
    assert 0 < host < result["critical_path_us"]["mean_us"] < result["step_total_us"]["mean_us"]


def test_the_engine_report_is_summarised_with_its_critical_flags(bench, model_dir, tmp_path,
                                                                 monkeypatch):
    from llmserve.engine.llm_engine import LLMEngine

    fake = {"launch": (0.001, True), "detokenize": (0.004, False)}
    monkeypatch.setattr(LLMEngine, bench.ENGINE_REPORT_METHOD, lambda self: fake, raising=False)
    report = _run(bench, model_dir, tmp_path, "--batch-sizes", "2",
                  "--engine-arg", "enable_prefix_caching=false")
    assert report["config"]["engine_arg"] == {"enable_prefix_caching": False}
    engine_report = report["results"][0]["engine_report"]
    assert engine_report["phases"]["launch"]["median_us"] == pytest.approx(1000)
    assert engine_report["phases"]["detokenize"]["critical"] is False
    assert engine_report["critical_path_us"]["mean_us"] == pytest.approx(1000)
    assert engine_report["step_total_us"]["mean_us"] == pytest.approx(5000)


def test_a_phase_table_that_does_not_fit_the_engine_is_a_clear_error(bench):
    timer = bench.PhaseTimer(["sample"])
    engine = SimpleNamespace(runner=SimpleNamespace(sampler=object()))
    missing_attr = (bench.Phase("sample", (("runner.sampler2", "__call__"),)),)
    with pytest.raises(ValueError, match="runner.sampler2.*adapt PHASES"):
        bench.install_timers(engine, missing_attr, timer)
    missing_method = (bench.Phase("sample", (("runner.sampler", "sample"),)),)
    with pytest.raises(ValueError, match="no method 'sample'.*adapt PHASES"):
        bench.install_timers(engine, missing_method, timer)


def test_the_request_mix(bench, model_dir):
    from llmserve.tokenizer import Tokenizer

    requests = bench.make_requests(Tokenizer.from_pretrained(model_dir), 20, 30, 40, seed=0)
    params = [p for _, p in requests]
    assert sum(p.get("top_p", 1.0) == 0.9 and p["temperature"] > 0 for p in params) == 10
    assert sum("stop" in p for p in params) == 4
    assert sum(p.get("logprobs") == 5 for p in params) == 2
    assert all(p["ignore_eos"] for p in params)
    assert params[0] == {"temperature": 0.0, "ignore_eos": True}  # batch 1 is plain greedy
    assert all(30 <= len(ids) <= 40 for ids, _ in requests)


def test_a_phase_whose_methods_are_never_called_is_a_clear_error(bench, model_dir, tmp_path,
                                                                  monkeypatch):
    # A method that exists but that the step no longer calls would otherwise read as 0 µs.
    stale = bench.PHASES + (bench.Phase("abort", (("", "abort_request"),)),)
    monkeypatch.setattr(bench, "PHASES", stale)
    with pytest.raises(ValueError, match=r"'abort'.*adapt PHASES"):
        _run(bench, model_dir, tmp_path, "--batch-sizes", "1")


def test_a_class_target_times_objects_made_during_the_run_and_is_undone(bench, model_dir,
                                                                        tmp_path, monkeypatch):
    from llmserve.engine.request import Request

    original = Request.__dict__["append_token"]
    phase = bench.Phase("append", (("llmserve.engine.request:Request", "append_token"),))
    monkeypatch.setattr(bench, "PHASES", bench.PHASES + (phase,))
    result = _run(bench, model_dir, tmp_path, "--batch-sizes", "3")["results"][0]
    assert result["phases"]["append"]["median_us"] > 0
    assert Request.__dict__["append_token"] is original
