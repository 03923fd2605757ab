"""A model-free engine core for tests: a real Scheduler, KVCacheManager and BlockPool, with
sampled tokens fabricated the way `LLMEngine._complete` feeds real ones back."""

from __future__ import annotations

from llmserve.config import SchedulerConfig
from llmserve.engine.kv_cache_manager import KVCacheManager
from llmserve.engine.request import Request
from llmserve.engine.scheduler import Scheduler, SchedulerOutput
from llmserve.sampling_params import SamplingParams

EOS = 2


def make_request(rid: str, prompt: list[int] | int, max_tokens: int = 4, priority: int = 0,
                 **params) -> Request:
    """A request with `prompt` token ids (or that many distinct ids from 1000 on)."""
    ids = list(range(1000, 1000 + prompt)) if isinstance(prompt, int) else list(prompt)
    return Request(rid, ids, SamplingParams(max_tokens=max_tokens, **params), max_tokens,
                   frozenset({EOS}), priority=priority)


class Core:
    """Scheduler + KV manager + pool; `step()` schedules and feeds back one token per sampler."""

    def __init__(self, num_blocks: int = 8, block_size: int = 4, max_num_seqs: int = 4,
                 max_num_batched_tokens: int = 16, max_model_len: int = 64,
                 enable_caching: bool = True) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, enable_caching)
        self.pool = self.kv.pool
        self.sched = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), self.kv,
                               max_model_len)

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.sched.add_request(request)

    def schedule(self) -> SchedulerOutput:
        return self.sched.schedule()

    def update(self, out: SchedulerOutput, tokens: dict[str, int] | None = None) -> list[Request]:
        """Feed back a token for every request that sampled in `out` (default: 100 + its output
        index, never EOS), as `LLMEngine._complete` does with the model's samples."""
        tokens = tokens or {}
        sampled = {}
        for i in out.sample_indices:
            request = out.scheduled[i][0]
            rid = request.request_id
            sampled[rid] = tokens.get(rid, 100 + request.num_output_tokens)
        return self.sched.update_from_output(out, sampled)

    def step(self, tokens: dict[str, int] | None = None) -> SchedulerOutput:
        """One synchronous step: schedule, then feed back its sampled tokens."""
        out = self.schedule()
        self.update(out, tokens)
        return out

    # -- views for assertions ----------------------------------------------------------------
    def blocks(self, rid: str) -> list[int]:
        return self.kv.block_ids(rid)

    def free_queue(self) -> list[int]:
        """Block ids in eviction order (the head is handed out first)."""
        return list(self.pool.free_queue)

    def cached_ids(self) -> set[int]:
        return {b.block_id for b in self.pool.cached.values()}

    def waiting_ids(self) -> list[str]:
        return [r.request_id for r in self.sched.waiting]

    def running_ids(self) -> list[str]:
        return [r.request_id for r in self.sched.running]


def scheduled(out: SchedulerOutput) -> list[tuple[str, int]]:
    """(request id, tokens computed) per scheduled request, in batch order."""
    return [(r.request_id, n) for r, n in out.scheduled]
