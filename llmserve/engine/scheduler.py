"""Token-budget scheduler with no phases.

Every step each running request asks for the tokens it still has to compute (its length minus
`num_computed_tokens`), capped by what is left of `max_num_batched_tokens`. Prefill, chunked
prefill, prefix-cache hits, recompute after preemption and decode are all that one rule. When
the KV pool cannot hold a running request's next tokens, the newest running request is
preempted (its blocks freed, its progress reset, put back at the front of the queue).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from llmserve.config import SchedulerConfig
from llmserve.engine.kv_cache_manager import KVCacheManager
from llmserve.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """The requests of one step, in batch order, with how many tokens each computes."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)
    # Filled by update_from_output: parent request id -> (prefill-style tokens, decode tokens).
    work: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int
    ) -> None:
        self.config = config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- admission -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        now = time.time()
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:  # nothing to do until its last token is sampled
                i += 1
                continue
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()  # newest first; never one already scheduled
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append((request, num_new))
                budget -= num_new
                i += 1
        if not out.preempted:
            budget = self._admit_waiting(out, budget, now)
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int, now: float) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hit_blocks, num_hit = [], 0
            if request.num_computed_tokens == 0:
                hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            if self.kv.allocate_slots(request, num_new, hit_blocks) is None:
                break  # head-of-line waits for blocks; order stays first-come first-served
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append((request, num_new))
            budget -= num_new
        return budget

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # -- after the forward pass ------------------------------------------------------------
    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[str, int]
    ) -> list[Request]:
        """Advance each scheduled request; append sampled tokens; return requests that changed.

        `sampled` maps request id -> token for requests that reached their length this step.
        A request that finishes (EOS, stop token, max_tokens, context full) is freed here.
        """
        changed = []
        for request, num_new in out.scheduled:
            if request.is_finished:  # aborted while the step ran
                continue
            # Cost accounting: a single token after the first output is a decode; everything
            # else (prompt, chunks, recompute after preemption) is prefill-style work.
            prefill, decode = (0, 1) if num_new == 1 and request.num_output_tokens > 0 else (num_new, 0)
            request.num_prefill_tokens_run += prefill
            request.num_decode_tokens_run += decode
            p, d = out.work.get(request.parent_id, (0, 0))
            out.work[request.parent_id] = (p + prefill, d + decode)
            request.num_computed_tokens += num_new
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.append_token(token)
            self._check_stop(request, token)
            changed.append(request)
            if request.is_finished:
                self.finish(request, request.status)
        return changed

    def _check_stop(self, request: Request, token: int) -> None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, None
                return
            if token in params.stop_token_ids:
                request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, token
                return
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH

    # -- finishing and aborting --------------------------------------------------------------
    def finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished and free everything it holds (idempotent)."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.kv.free(request)
        self.requests.pop(request.request_id, None)

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        aborted = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None and not request.is_finished:
                self.finish(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        return aborted
