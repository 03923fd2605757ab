"""RequestOutput / CompletionOutput: the one contract between the engine and every frontend.

Outputs are cumulative: each RequestOutput for a request carries the whole text and token ids
generated so far, so a streaming frontend computes deltas against what it already sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log probability of one token at one position, with its rank in the distribution (1 = best)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob. It holds the chosen token plus the top-k.
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token (SamplingParams.prompt_logprobs): the first is None (nothing
# predicts it), each other is {the prompt's token: Logprob, then the top-k ids: Logprob}.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of a request's life, for latency and cost accounting."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One completion (choice) of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    # With finish_reason "abort": why the engine ended it because of the request itself (its
    # grammar failed to compile or timed out), for the client's error message; None when a
    # client or the server aborted it.
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and every completion so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    # Compute attributed to this request (prefill and decode tokens actually run), for costing.
    num_computed_prefill_tokens: int = 0
    num_computed_decode_tokens: int = 0
    extra: dict = field(default_factory=dict)
    # Set once every prompt token is scored, on that output and every later one; None when the
    # request did not ask (SamplingParams.prompt_logprobs) or while its prefill runs.
    prompt_logprobs: PromptLogprobs | None = None
