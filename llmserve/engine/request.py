"""Request: one sequence being generated, as the scheduler and KV manager see it."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import torch

from llmserve.outputs import Logprob, RequestMetrics
from llmserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmserve.structured.request_grammar import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class Request:
    """A single sequence. `n > 1` is fanned out into one Request per completion.

    The scheduler's one rule: every step, a request advances `num_computed_tokens` toward
    `num_tokens` (prompt plus outputs so far). When a step brings it level, the sampled token is
    appended. Prefill, chunked prefill, prefix-cache hits, recompute after preemption and decode
    are all that rule.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        eos_token_ids: frozenset[int] = frozenset(),
        parent_id: str | None = None,
        index: int = 0,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.parent_id = parent_id or request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.priority = priority
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Tokens sampled by a step still in flight (async scheduling): scheduled as this
        # request's next input, appended once the step's results are read.
        self.num_output_placeholders = 0
        self.num_cached_tokens = -1  # set at first scheduling
        self.block_hashes: list[int] = []
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        # Why the engine itself aborted the request (its grammar failed to compile); None for
        # aborts by a client or the server.
        self.error: str | None = None
        self.logprobs: list[dict[int, Logprob]] | None = (
            [] if sampling_params.logprobs is not None else None
        )
        self.cumulative_logprob = 0.0
        # Prompt logprobs (SamplingParams.prompt_logprobs), one entry per prompt token filled
        # as the prefill chunks run; the first stays None. Only the first completion of an
        # n > 1 request scores the prompt (they share it).
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] * len(self.prompt_token_ids)
            if sampling_params.prompt_logprobs is not None and index == 0 else None
        )
        self.num_prompt_logprobs = 0  # entries of prompt_logprobs filled so far
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        # Work actually run for this request, for cost attribution (recompute counts again).
        self.num_prefill_tokens_run = 0
        self.num_decode_tokens_run = 0
        # Constrained decoding state (structured outputs), set by the engine when it adds one.
        self.grammar: RequestGrammar | None = None
        self.generator: torch.Generator | None = None
        if sampling_params.seed is not None:
            # Children of an n > 1 request get distinct but reproducible streams.
            self.generator = torch.Generator()
            self.generator.manual_seed((sampling_params.seed + index * 1_000_003) % 2**63)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Prompt logprobs are asked for and not all scored yet (no prefix-cache hits then)."""
        return (self.prompt_logprobs is not None
                and self.num_prompt_logprobs < len(self.prompt_token_ids) - 1)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
