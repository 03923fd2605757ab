"""The online batch worker on a real AsyncEngine: priority below interactive traffic, cancel."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

from batch_helpers import chat_line, completion_line

from llmserve.batch.options import BatchOptions
from llmserve.batch.store import BatchStore
from llmserve.batch.worker import BatchWorker
from llmserve.engine.async_engine import AsyncEngine
from llmserve.sampling_params import SamplingParams


class _Steps:
    """Counts engine steps, so waits are measured in work rather than in wall time."""

    def __init__(self) -> None:
        self.count = 0

    def on_step(self, step) -> None:
        self.count += 1


def _setup(tmp_path, model_dir, rows, **options):
    engine = AsyncEngine.from_args(model=model_dir, dtype="float32", num_kv_blocks=256,
                                   max_num_seqs=4)
    store = BatchStore(tmp_path / "batches")
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    source = store.add_file(data, "in.jsonl", "batch")
    batch = store.add_batch(source["id"], rows[0]["url"], "24h", 3600, None)
    worker = BatchWorker(engine, store, BatchOptions(root=tmp_path, **options))
    return engine, store, batch, worker


async def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _run_to_status(engine, store: BatchStore, batch: dict, worker: BatchWorker,
                         status: str) -> None:
    """Run the worker until the batch reaches `status`, then stop it and the engine."""
    worker.start()
    try:
        await _wait(lambda: store.get_batch(batch["id"])["status"] == status)
    finally:
        await worker.stop()
        engine.shutdown()


def _output_ids(store: BatchStore, batch: dict) -> Counter:
    ids: Counter = Counter()
    for key in ("output_file_id", "error_file_id"):
        if batch[key]:
            text = store.file_path(batch[key]).read_text(encoding="utf-8")
            ids.update(json.loads(s)["custom_id"] for s in text.splitlines())
    return ids


async def test_interactive_request_preempts_running_batch_lines(tmp_path, model_dir):
    rows = [completion_line(f"long-{i}", f"essay {i}", max_tokens=120, ignore_eos=True)
            for i in range(10)]
    engine, store, batch, worker = _setup(tmp_path, model_dir, rows, busy_concurrency=1)
    steps = _Steps()
    engine.add_observer(steps)
    worker.start()
    try:
        await _wait(lambda: engine.stats().get("num_running") == 4)  # the batch fills the engine
        started = steps.count
        stream = await engine.add_request("chat-1", "quick question", SamplingParams(
            max_tokens=3, temperature=0, ignore_eos=True))
        out = None
        async for update in stream:
            out = update
        waited = steps.count - started
        # Without preemption it would wait ~100 steps for a batch line to finish. With it, the
        # worker reacts within a poll interval, which faster steps fill with more of them (11 seen
        # on a loaded CI machine), so the bound keeps a wide margin on both sides.
        assert out.outputs[0].finish_reason == "length" and waited <= 40, waited
        # Batch lines run at BATCH_PRIORITY, so the engine's scheduler preempts one for the chat
        # request at its next step, before the worker's poll could abort lines itself.
        assert engine.stats()["num_preemptions"] >= 1
        await _wait(lambda: store.get_batch(batch["id"])["status"] == "completed")
    finally:
        await worker.stop()
        engine.shutdown()
    done = store.get_batch(batch["id"])
    assert done["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    assert _output_ids(store, done) == Counter(f"long-{i}" for i in range(10))


async def test_cancel_mid_batch_keeps_finished_results_and_stops_the_rest(tmp_path, model_dir):
    rows = [chat_line(f"c{i}", f"topic {i}", max_tokens=120, ignore_eos=True) for i in range(16)]
    # Counts saved often, so the cancel lands while most lines are still to run.
    engine, store, batch, worker = _setup(tmp_path, model_dir, rows, counts_interval_s=0.01)
    worker.start()
    try:
        await _wait(lambda: store.get_batch(batch["id"])["request_counts"]["completed"] >= 4)
        assert store.cancel_batch(batch["id"])["status"] == "cancelling"
        worker.cancel(batch["id"])
        await _wait(lambda: store.get_batch(batch["id"])["status"] == "cancelled")
        await _wait(lambda: engine.stats().get("num_running") == 0, 10)
    finally:
        await worker.stop()
        engine.shutdown()
    done = store.get_batch(batch["id"])
    ids = _output_ids(store, done)
    assert 4 <= len(ids) < 16 and set(ids.values()) == {1}
    assert done["request_counts"]["completed"] == len(ids)
    assert done["cancelled_at"] is not None and done["output_file_id"]


async def test_structurally_bad_input_fails_the_batch_with_line_numbers(tmp_path, model_dir):
    rows = [chat_line("a", "x"), chat_line("a", "y"), completion_line("b", "z")]
    engine, store, batch, worker = _setup(tmp_path, model_dir, rows)
    await _run_to_status(engine, store, batch, worker, "failed")
    errors = store.get_batch(batch["id"])["errors"]["data"]
    assert [(e["line"], e["code"]) for e in errors] == [(2, "duplicate_custom_id"),
                                                        (3, "mismatched_url")]


async def test_a_line_whose_grammar_fails_to_compile_is_failed_not_rerun(tmp_path, model_dir):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    rows = [chat_line("bad", "hi", response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})]
    rows += [chat_line(f"ok{i}", f"topic {i}") for i in range(3)]
    engine, store, batch, worker = _setup(tmp_path, model_dir, rows)
    compiles = []

    def refuse(spec):
        compiles.append(spec)
        raise ValueError("the backend refused this schema")

    engine.engine.structured.backend.compile = refuse
    await _run_to_status(engine, store, batch, worker, "completed")
    done = store.get_batch(batch["id"])
    assert done["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert len(compiles) == 1  # run once, never queued again
    errors = [json.loads(s) for s in
              store.file_path(done["error_file_id"]).read_text(encoding="utf-8").splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad"]
    body = errors[0]["response"]["body"]
    assert errors[0]["response"]["status_code"] == 400
    assert body["error"]["code"] == "invalid_grammar"
    assert "refused this schema" in body["error"]["message"]
