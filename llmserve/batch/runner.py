"""Offline batch runner: a whole JSONL job through one LLMEngine, with durable progress.

Every line's request goes to the scheduler up front (up to `max_pending` lines at a time, far
more than a step can hold), so the engine batches them exactly as `LLM.generate` would; results
are written and flushed the moment a line's last completion finishes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from llmserve.batch.bodies import (
    BATCH_PRIORITY,
    Failed,
    ModelView,
    Prepared,
    prepare,
    response_body,
    result_line,
    usage_of,
)

if TYPE_CHECKING:
    from llmserve.batch.lines import BatchLine
    from llmserve.batch.progress import ResultLog
    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.outputs import RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    """What one run did. `skipped` lines were already done by an earlier run."""

    total: int
    skipped: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed: float = 0.0
    invalid: list[Failed] = field(default_factory=list)

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class _Line:
    prep: Prepared
    outputs: list[RequestOutput | None]
    remaining: int


class BatchRunner:
    """Run batch lines on an `LLMEngine` (which this runner drives exclusively while it runs).

    Args:
        engine: the engine; nothing else may add requests to it during `run`.
        served_names: model names a line's `model` may use (default: the engine's name).
        max_pending: lines handed to the scheduler at once (default: max(1024, 4 x max_num_seqs)).
        use_tqdm: show a progress bar with requests/s, output tok/s and the ETA.
        observers: objects with AsyncEngine observer hooks (`on_request_added`, `on_step`,
            `on_finished`), e.g. the trace recorder; each engine request's info carries
            `route="batch"`, the line's url as `endpoint` and its `custom_id`.
        parsers: (tool-call parser, reasoning parser) names, as `serve`'s --tool-call-parser and
            --reasoning-parser (None: the tool-call format detected from the chat template, and
            no reasoning split).
    """

    def __init__(self, engine: LLMEngine, served_names: list[str] | None = None,
                 max_pending: int | None = None, use_tqdm: bool = True,
                 observers: Sequence[Any] = (),
                 parsers: tuple[str | None, str | None] = (None, None)) -> None:
        if max_pending is not None and max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.engine = engine
        self.served_names = list(served_names or [engine.model_name])
        self.max_pending = max_pending or max(1024, 4 * engine.config.scheduler.max_num_seqs)
        self.use_tqdm = use_tqdm
        self.observers = list(observers)
        self.parsers = parsers
        self._inflight: dict[str, tuple[_Line, int]] = {}
        self._lines_inflight = 0
        self._next_id = 0

    def prepare(self, lines: list[BatchLine]) -> list[Prepared | Failed]:
        """Validate and tokenize every line's body (before anything runs)."""
        view = ModelView.build(self.engine.tokenizer, self.served_names,
                               self.engine.max_model_len, *self.parsers)
        return [prepare(line, view) for line in lines]

    def run(self, lines: list[BatchLine], log: ResultLog,
            on_invalid: Callable[[list[Failed]], None] | None = None) -> BatchSummary:
        """Run every line not yet in `log`; return the counts of this run.

        Every body is validated before anything runs; `on_invalid` gets the bad ones then (they
        are written as error results, the rest of the job runs).
        """
        todo = [line for line in lines if line.custom_id not in log.done]
        summary = BatchSummary(total=len(lines), skipped=len(lines) - len(todo))
        items = self.prepare(todo)
        summary.invalid = [i for i in items if isinstance(i, Failed)]
        if summary.invalid and on_invalid is not None:
            on_invalid(summary.invalid)
        start = time.perf_counter()
        bar = tqdm(total=len(todo), desc="Batch", unit="req", disable=not self.use_tqdm,
                   dynamic_ncols=True)
        with bar:
            for bad in summary.invalid:
                self._fail(log, summary, bad)
                bar.update(1)
            self._loop(deque(i for i in items if isinstance(i, Prepared)), log, summary, bar,
                       start)
        summary.elapsed = time.perf_counter() - start
        return summary

    def _loop(self, queue: deque[Prepared], log: ResultLog, summary: BatchSummary, bar: tqdm,
              start: float) -> None:
        while queue or self._inflight:
            while queue and self._lines_inflight < self.max_pending:
                self._submit(queue.popleft(), log, summary, bar)
            if not self._inflight:
                continue
            outputs = self.engine.step()
            if self.observers and self.engine.last_step is not None:
                self._notify("on_step", self.engine.last_step)
            for out in outputs:
                if out.finished:
                    self._notify("on_finished", out, _usage(out), _timings(out))
                    self._finish(out, log, summary, bar, start)

    def _submit(self, prep: Prepared, log: ResultLog, summary: BatchSummary, bar: tqdm) -> None:
        line = _Line(prep, [None] * len(prep.prompts), len(prep.prompts))
        rids = []
        try:
            for k, prompt in enumerate(prep.prompts):
                rid = f"batch-{self._next_id}"
                self._next_id += 1
                rids.append(rid)
                arrival = time.time()
                ids = self.engine.add_request(rid, prompt, prep.params, arrival_time=arrival,
                                              priority=BATCH_PRIORITY)
                self._notify("on_request_added", rid, _info(prep, ids, arrival))
                self._inflight[rid] = (line, k)
        except ValueError as exc:  # e.g. larger than the whole KV pool
            for rid in rids:
                self._inflight.pop(rid, None)
            self.engine.abort_request(rids)
            self._fail(log, summary, Failed(prep.line, 400, str(exc)[:1000]))
            bar.update(1)
            return
        self._lines_inflight += 1

    def _finish(self, out: RequestOutput, log: ResultLog, summary: BatchSummary, bar: tqdm,
                start: float) -> None:
        entry = self._inflight.pop(out.request_id, None)
        if entry is None:
            return  # an aborted sibling of a line that already failed
        line, k = entry
        error = next((c.error for c in out.outputs if c.error), None)
        if error is not None:  # e.g. its grammar failed to compile: the line fails, siblings end
            siblings = [rid for rid, (other, _) in self._inflight.items() if other is line]
            for rid in siblings:
                del self._inflight[rid]
            if siblings:
                self.engine.abort_request(siblings)
            self._lines_inflight -= 1
            self._fail(log, summary, Failed(line.prep.line, 400, error, code="invalid_grammar"))
            bar.update(1)
            return
        line.outputs[k] = out
        line.remaining -= 1
        if line.remaining:
            return
        self._lines_inflight -= 1
        outputs = [o for o in line.outputs if o is not None]
        body = response_body(line.prep, outputs, self.engine.tokenizer)
        log.write(result_line(line.prep.line.custom_id, 200, body, line.prep.request_id))
        prompt, completion = usage_of(outputs)
        summary.completed += 1
        summary.prompt_tokens += prompt
        summary.completion_tokens += completion
        bar.update(1)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{summary.completion_tokens / elapsed:.1f} out tok/s", refresh=False)

    def _notify(self, name: str, *args: Any) -> None:
        for observer in self.observers:
            fn = getattr(observer, name, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - an observer must never break the job
                logger.exception("batch observer hook %s failed", name)

    @staticmethod
    def _fail(log: ResultLog, summary: BatchSummary, bad: Failed) -> None:
        log.write(result_line(bad.line.custom_id, bad.status, bad.body()))
        summary.failed += 1


def _info(prep: Prepared, prompt_ids: list[int], arrival: float) -> dict:
    """What an observer learns about one engine request of a line (as the server passes it)."""
    return prep.info(prompt_token_ids=prompt_ids, params=prep.params, arrival_time=arrival)


def _usage(out: RequestOutput) -> dict:
    prompt, completion = usage_of([out])
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "cached_tokens": out.num_cached_tokens}


def _timings(out: RequestOutput) -> dict:
    m = out.metrics
    now = time.time()
    if m is None:
        return {"arrival_time": now, "finished_time": now, "e2e": 0.0}
    finished = m.finished_time or now
    return {"arrival_time": m.arrival_time, "first_scheduled_time": m.first_scheduled_time,
            "first_token_time": m.first_token_time, "finished_time": finished,
            "queue_time": m.queue_time, "ttft": m.ttft, "e2e": finished - m.arrival_time}
