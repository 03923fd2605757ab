"""Token-budget scheduler with no phases.

Every step each running request asks for the tokens it still has to compute (its length minus
`num_computed_tokens`), capped by what is left of `max_num_batched_tokens`. Prefill, chunked
prefill, prefix-cache hits, recompute after preemption and decode are all that one rule.

Priority (vLLM's priority policy): lower `Request.priority` values are served first, ties in
arrival order. Both queues are kept in that order, so running requests get the token budget
most urgent first, waiting ones are admitted most urgent first, and when the KV pool cannot
hold a running request's next tokens the least urgent running request (the newest within its
class) is preempted: its blocks freed, its progress reset, and it is put back at the front of
its priority class in the waiting queue. A waiting request that is more urgent than a running
one and cannot be admitted (no free sequence slot or too few free blocks) preempts running
requests less urgent than itself, least urgent first. With every priority equal this is plain
first-come first-served.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from llmserve.config import SchedulerConfig
from llmserve.engine.kv_cache_manager import KVCacheManager
from llmserve.engine.request import Request, RequestStatus
from llmserve.engine.request_queue import RequestQueue, insertion_index


class ScheduledRequest(NamedTuple):
    """One entry of a step's batch: the request and how many tokens it computes this step."""

    request: Request
    num_new_tokens: int


class StepWork(NamedTuple):
    """Tokens computed for one user request (all its n children) in a step, for cost attribution."""

    prefill_tokens: int  # prompt, prompt chunks, recompute after preemption
    decode_tokens: int  # one per decode whose token was kept


@dataclass
class SchedulerOutput:
    """The requests of one step, in batch order, with how many tokens each computes.

    `starts[i]` is where request i's new tokens begin (its `num_computed_tokens` before this
    step: the scheduler advances it when it schedules). `new_block_ids[i]` lists the blocks
    request i gained this step, and `freed_ids` the requests whose blocks were released since
    the previous step: the model runner keeps its block tables in step with these deltas.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    freed_ids: list[str] = field(default_factory=list)
    # Indices into `scheduled` of the requests that sample a token this step.
    sample_indices: list[int] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)
    # Parent request id -> its work: prefill-style tokens when scheduled, decodes once kept
    # (filled by update_from_output).
    work: dict[str, StepWork] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def add(self, request: Request, num_new: int, new_blocks: list[int]) -> None:
        self.scheduled.append(ScheduledRequest(request, num_new))
        self.starts.append(request.num_computed_tokens)
        self.new_block_ids.append(new_blocks)


class Scheduler:
    """Decides, each step, which requests run and how many tokens each computes.

    Running requests go first, in priority order (lower value first, then oldest admitted);
    waiting ones are admitted by (priority, arrival) while the token budget, `max_num_seqs` and
    the KV pool allow. Drive it with `schedule()`, then `update_from_output()` with the tokens
    the step sampled; `abort()` and `finish()` free a request's blocks at any time.

    Scheduling a request advances its `num_computed_tokens` at once, and a request that will
    sample gets an output placeholder, so the next step can be scheduled while this one still
    runs (async scheduling); `update_from_output` later appends the sampled tokens and applies
    stops.
    """

    def __init__(
        self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int
    ) -> None:
        self.config = config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.waiting = RequestQueue()  # (priority, arrival) order
        self.running: list[Request] = []  # priority order, then admission order
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._freed: list[str] = []  # released since the last schedule(), for the runner

    # -- admission -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        now = time.time()
        self._preempt_for_waiting(out)
        num_preempted_for_waiting = len(out.preempted)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            pending = request.num_output_placeholders
            num_new = min(request.num_tokens + pending - request.num_computed_tokens, budget)
            if num_new <= 0 or (pending and self._ends_with_pending(request)):
                i += 1  # nothing to do until its last token is known, or that token ends it
                continue
            while (new_blocks := self.kv.allocate_slots(request, num_new)) is None:
                # Least urgent, newest within its class; never one already scheduled (the
                # running list is in priority order and is scheduled from the front).
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                self._schedule(out, request, num_new, new_blocks)
                budget -= num_new
                i += 1
        if len(out.preempted) == num_preempted_for_waiting:  # no running request lacked room
            budget = self._admit_waiting(out, budget, now)
        # Taken last, so the rows of requests preempted just now are free for the new ones.
        out.freed_ids, self._freed = self._freed, []
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _ends_with_pending(self, request: Request) -> bool:
        """Whether the token still in flight is its last (max_tokens or the context is full)."""
        pending = request.num_output_placeholders
        return (
            request.num_output_tokens + pending >= request.max_tokens
            or request.num_tokens + pending >= self.max_model_len
        )

    def _schedule(self, out: SchedulerOutput, request: Request, num_new: int,
                  new_blocks: list[int]) -> None:
        out.add(request, num_new, new_blocks)
        if not _is_decode(request, num_new, request.num_computed_tokens):
            # Prefill-style work (prompt, chunks, recompute after preemption) is billed when it
            # is scheduled; a decode only once its token is kept (see update_from_output).
            request.num_prefill_tokens_run += num_new
            p, d = out.work.get(request.parent_id, (0, 0))
            out.work[request.parent_id] = StepWork(p + num_new, d)
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
            out.sample_indices.append(len(out.scheduled) - 1)
            request.num_output_placeholders += 1  # this step samples its next token

    def _admit_waiting(self, out: SchedulerOutput, budget: int, now: float) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_output_placeholders:
                break  # preempted with a token in flight: re-admit once that token is known
            hit_blocks, num_hit = [], 0
            if request.num_computed_tokens == 0:
                hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            new_blocks = self.kv.allocate_slots(request, num_new, hit_blocks)
            if new_blocks is None:
                break  # head-of-line waits for blocks; order stays (priority, arrival)
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            request.status = RequestStatus.RUNNING
            self.running.insert(insertion_index(self.running, request.priority), request)
            self._schedule(out, request, num_new, new_blocks)
            budget -= num_new
        return budget

    def _preempt_for_waiting(self, out: SchedulerOutput) -> None:
        """Preempt running requests less urgent than the waiting head while it cannot be admitted.

        "Cannot be admitted" is judged before this step's work: no free sequence slot, or fewer
        free blocks than its first chunk needs without prefix hits (a conservative estimate: a
        head with hits may preempt one request more than it needed to). Nothing is preempted
        when even all the less urgent requests' blocks would not make room.
        """
        if not self.waiting or not self.running:
            return
        head = self.waiting[0]
        if head.num_output_placeholders or self.running[-1].priority <= head.priority:
            return  # the usual case, equal priorities: nothing to compare further
        need = self.kv.blocks_needed(min(head.num_tokens, self.config.max_num_batched_tokens))
        held = self.kv.req_blocks
        if self.kv.num_free_blocks + sum(len(held.get(r.request_id, ())) for r in self.running
                                         if r.priority > head.priority) < need:
            return
        while self.running and self.running[-1].priority > head.priority and (
            len(self.running) >= self.config.max_num_seqs or self.kv.num_free_blocks < need
        ):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_front(request)

    def _release(self, request: Request) -> None:
        self.kv.free(request)
        self._freed.append(request.request_id)

    # -- after the forward pass ------------------------------------------------------------
    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[str, int]
    ) -> list[Request]:
        """Bill decodes; append sampled tokens; return the requests that changed.

        `sampled` maps request id -> token for requests whose step brought them level with
        their length. A request that finished meanwhile (a stop seen one step late, an abort)
        drops its token: it never reaches outputs. One that finishes now (EOS, stop token,
        max_tokens, context full) is freed here.
        """
        changed = []
        for (request, num_new), start in zip(out.scheduled, out.starts):
            token = sampled.get(request.request_id)
            if token is not None:
                request.num_output_placeholders -= 1
            if request.is_finished:  # aborted or stopped while the step ran
                continue
            if _is_decode(request, num_new, start):  # billed only when its token is kept
                request.num_decode_tokens_run += 1
                p, d = out.work.get(request.parent_id, (0, 0))
                out.work[request.parent_id] = StepWork(p, d + 1)
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
        self._release(request)
        self.requests.pop(request.request_id, None)

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        aborted = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None and not request.is_finished:
                self.finish(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        return aborted


def _is_decode(request: Request, num_new: int, start: int) -> bool:
    """One new token whose input is an output token: a decode, for cost accounting. Everything
    else (prompt, chunks, recompute after preemption) is prefill-style work."""
    return num_new == 1 and start >= request.num_prompt_tokens
