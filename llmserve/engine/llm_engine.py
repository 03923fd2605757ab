"""LLMEngine: synchronous add_request / step / abort over the scheduler and the model runner."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llmserve.attention.windows import kv_release_window
from llmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from llmserve.engine.admission import PromptType, check_lengths, check_token_ids, tokenize_prompt
from llmserve.engine.executor import create_runner
from llmserve.engine.kv_cache_manager import KVCacheManager
from llmserve.engine.model_runner import InFlightStep
from llmserve.engine.output_processor import OutputProcessor
from llmserve.engine.request import Request, RequestStatus
from llmserve.engine.sampler import needs_output_history
from llmserve.engine.scheduler import Scheduler, StepWork
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.structured.manager import StructuredOutputManager
from llmserve.tokenizer import Tokenizer


@dataclass
class StepStats:
    """Wall time of one step and the work each request did in it (for cost attribution)."""

    start: float
    end: float
    # parent request id -> (prefill-style tokens, decode tokens) computed in this step
    work: dict[str, StepWork] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.start


def build_engine_config(model: str | None = None, **kwargs) -> EngineConfig:
    """EngineConfig from LLM(...)-style keyword arguments; `model=None` is the embedded default."""
    if model is None:
        from llmserve.models.default_model import ensure_default_model

        model = ensure_default_model()
    groups = {
        ModelConfig: ("dtype", "max_model_len", "seed", "device"),
        CacheConfig: ("block_size", "num_kv_blocks", "memory_fraction", "cpu_kv_cache_gib", "enable_prefix_caching"),
        SchedulerConfig: ("max_num_seqs", "max_num_batched_tokens"),
    }
    parts = {cls: {k: kwargs.pop(k) for k in keys if k in kwargs} for cls, keys in groups.items()}
    allowed = {
        "attention_backend", "enforce_eager", "tokenizer", "tensor_parallel_size", "async_scheduling",
        "structured_outputs_backend",
    }
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"unknown engine option(s): {sorted(unknown)}")
    config = EngineConfig(
        model=ModelConfig(model=str(model), **parts[ModelConfig]),
        cache=CacheConfig(**parts[CacheConfig]),
        scheduler=SchedulerConfig(**parts[SchedulerConfig]),
        **kwargs,
    )
    config.validate()
    return config


def served_model_name(model_dir: str) -> str:
    """The name clients use: the directory's basename, or `llmserve-default` for the embedded model."""
    from llmserve.models.default_model import DEFAULT_MODEL_NAME

    path = Path(model_dir)
    if (path / "llmserve_default_model.json").exists():  # marker written by ensure_default_model
        return DEFAULT_MODEL_NAME
    return path.name


class LLMEngine:
    """The engine core. Not thread-safe: one caller drives add_request / abort / step."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self.model_name = served_model_name(config.model.model)
        self.tokenizer = Tokenizer.from_pretrained(config.tokenizer or config.model.model)
        # A ModelRunner at TP=1; at TP>1 an executor driving one worker process per other rank.
        self.runner = create_runner(config)
        self.max_model_len = config.max_model_len
        self.block_size = config.cache.block_size
        self.kv = KVCacheManager(self.runner.num_blocks, self.block_size, config.cache.enable_prefix_caching,
                                 kv_release_window(config.model.hf_config))
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.outputs = OutputProcessor(self.tokenizer)
        self.structured = StructuredOutputManager(
            self.tokenizer, self.runner.vocab_size, config.structured_outputs_backend)
        self._aborted_outputs: list[RequestOutput] = []
        self.last_step: StepStats | None = None
        self.async_scheduling = config.resolved_async_scheduling
        self._inflight: InFlightStep | None = None  # launched, tokens not read yet

    @classmethod
    def from_args(cls, model: str | None = None, **kwargs) -> LLMEngine:
        return cls(build_engine_config(model, **kwargs))

    # -- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> list[int]:
        """Validate and queue a request; return its prompt token ids. Raises ValueError."""
        if request_id in self.outputs.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        vocab = self.runner.vocab_size
        text, prompt_ids = tokenize_prompt(prompt, self.tokenizer, vocab)
        max_tokens = check_lengths(len(prompt_ids), params, self.max_model_len, self.kv,
                                   self.config.scheduler.max_num_batched_tokens)
        check_token_ids(params, vocab)
        if params.prompt_logprobs is not None and self.config.tensor_parallel_size > 1:
            # The LM head is sharded: every rank would have to score the prompt rows too.
            raise ValueError("prompt_logprobs is not supported with tensor_parallel_size > 1")
        # A constraint that cannot compile is refused here, before the request is accepted.
        spec = self.structured.validate(params)
        eos = self.tokenizer.eos_token_ids
        arrival = arrival_time or time.time()
        children = [
            Request(
                f"{request_id}#{i}" if params.n > 1 else request_id,
                prompt_ids, params, max_tokens, eos, parent_id=request_id, index=i,
                arrival_time=arrival, priority=priority,
            )
            for i in range(params.n)
        ]
        for child in children[1:]:
            child.metrics = children[0].metrics  # one clock per user-visible request
        self.outputs.add(request_id, text, children)
        # A constrained request waits outside the scheduler until its grammar is compiled.
        ready = children if spec is None else self.structured.admit(spec, params, children)
        for child in ready:
            self.scheduler.add_request(child)
        return prompt_ids

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests (idempotent); each appears once more, finished, in the next step()."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for parent_id in request_ids:
            children = self.outputs.children(parent_id)
            if not children:
                continue
            self.scheduler.abort(r.request_id for r in children)
            for request in self.structured.drop({r.request_id for r in children}):
                request.status = RequestStatus.FINISHED_ABORTED  # held no blocks yet
            self._aborted_outputs.append(self.outputs.output(parent_id))

    # -- stepping ------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self._aborted_outputs)
                or self._inflight is not None or bool(self.structured.waiting))

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; return the outputs of the step that completed.

        Without async scheduling that is the step just launched. With it, the step launched by
        the previous call completes here, after this call has launched the next one: on a GPU
        the host reads tokens, applies stops and builds outputs while the device computes. A
        stop is then seen one step late; the extra token is dropped before anyone sees it.
        """
        self._admit_compiled()
        outputs, self._aborted_outputs = self._aborted_outputs, []
        start = time.time()
        work: dict[str, StepWork] = {}
        if self._inflight is not None and self._needs_history():
            outputs += self._complete(self._take_inflight(), work)
        sched = self.scheduler.schedule()
        launched = None
        if not sched.is_empty:
            launched = self.runner.launch(sched, self._inflight)
        elif sched.freed_ids:
            self.runner.batch.release(sched.freed_ids)
        if self._inflight is not None:
            outputs += self._complete(self._take_inflight(), work)
        if launched is not None:
            if self.async_scheduling:
                self._inflight = launched
            else:
                outputs += self._complete(launched, work)
        if sched.is_empty and not work:
            return outputs
        self.last_step = StepStats(start, time.time(), work)
        return outputs

    def _take_inflight(self) -> InFlightStep:
        inflight, self._inflight = self._inflight, None
        return inflight

    def _needs_history(self) -> bool:
        """Whether a running request samples from its full output history (penalties,
        min_tokens) or from a grammar (its next mask depends on the token in flight): then
        the step in flight is read before the next one is scheduled. So with async scheduling
        a constrained request's mask is always built from every token before it; steps
        without a constrained request still overlap."""
        needs_sync = self.structured.needs_sync
        return any(r.num_output_placeholders and (needs_output_history(r) or needs_sync(r))
                   for r in self.scheduler.running)

    def _admit_compiled(self) -> None:
        """Queue the requests whose grammar is now compiled; end those whose compilation
        failed or timed out (finish reason "abort"; the error is logged)."""
        if not self.structured.waiting:
            return
        idle = not self.scheduler.has_unfinished() and self._inflight is None
        ready, failed = self.structured.poll(idle=idle)
        for request in ready:
            self.scheduler.add_request(request)
        for request in failed:
            request.status = RequestStatus.FINISHED_ABORTED
            request.error = f"the request's grammar could not be compiled: {request.grammar.error}"
        for parent_id in dict.fromkeys(r.parent_id for r in failed):
            if all(c.is_finished for c in self.outputs.children(parent_id)):
                self._aborted_outputs.append(self.outputs.output(parent_id))

    def _complete(self, inflight: InFlightStep, work: dict[str, StepWork]
                  ) -> list[RequestOutput]:
        """Read a launched step's tokens; append them, apply stops, build outputs."""
        samples = inflight.result()
        sampling = inflight.sampling
        sampled = dict(zip((r.request_id for r in sampling), samples.token_ids)) if samples else {}
        changed = self.scheduler.update_from_output(inflight.sched, sampled)
        for request in self.structured.advance(changed):
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        for parent, (p, d) in inflight.sched.work.items():
            wp, wd = work.get(parent, (0, 0))
            work[parent] = StepWork(wp + p, wd + d)
        now = time.time()
        for request in changed:
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            request.metrics.last_token_time = now
        if samples is not None and any(lp is not None for lp in samples.logprobs):
            appended = {id(r) for r in changed}  # a dropped token's logprobs are dropped too
            for request, logprobs in zip(sampling, samples.logprobs):
                if logprobs is not None and id(request) in appended:
                    self.outputs.record_logprobs(request, logprobs)
        new_outputs, stopped = self.outputs.process(changed)
        for request in stopped:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
        for out in new_outputs:
            if out.finished and out.metrics is not None:
                out.metrics.finished_time = now
        return new_outputs

    def shutdown(self) -> None:
        """Stop tensor-parallel workers and leave the process group (no-op at TP=1)."""
        self.runner.shutdown()
        self.structured.shutdown()

    def stats(self) -> dict:
        return {
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": self.kv.prefix_cache_queries,
            "prefix_cache_hits": self.kv.prefix_cache_hits,
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_cache_usage": self.kv.usage(),
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting) + len(self.structured.waiting),
        }
