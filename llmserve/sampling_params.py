"""SamplingParams: how to sample one request's completions (vLLM field names)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Caps a server applies so one request cannot monopolise the engine.
MAX_N = 128
MAX_LOGPROBS = 20
_GREEDY_EPS = 1e-5
# OpenAI's range for logit_bias values.
LOGIT_BIAS_LIMIT = 100.0


@dataclass
class StructuredOutputsParams:
    """A constraint on a completion's text (vLLM's `structured_outputs` field names).

    Exactly one of `json` (a JSON schema, as a dict or a JSON string), `json_object` (any JSON
    object), `regex`, `choice` (one of these strings) or `grammar` (a Lark grammar, llguidance
    dialect) is set. When `after_token_ids` is set, the constraint starts only once the
    completion has produced that token sequence (the end of a reasoning block); the tokens
    before it are free.
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    after_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, "
                             f"choice or grammar; got {kinds or 'none'}")
        if self.choice is not None and (not self.choice or not all(
                isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        if self.json is not None and not isinstance(self.json, (dict, str, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its "
                             f"JSON text), got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.after_token_ids is not None:
            self.after_token_ids = tuple(self.after_token_ids)
            if not self.after_token_ids or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0
                    for t in self.after_token_ids):
                raise ValueError("structured_outputs.after_token_ids must be a non-empty list of "
                                 "token ids")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, json_object, regex, choice or grammar."""
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar")
                    if getattr(self, k) is not None)


@dataclass
class SamplingParams:
    """Sampling settings for one request.

    `temperature == 0` means greedy. `seed` makes the request's samples reproducible whatever
    else runs in the same batch. `stop` strings are trimmed from the returned text;
    `stop_token_ids` end the completion and are kept in `token_ids` but not in the text.
    `logprobs=k` returns the chosen token's logprob plus the top-k alternatives per token.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrained decoding: the completion's text must match this (see StructuredOutputsParams).
    structured_outputs: StructuredOutputsParams | None = None
    # Token id -> bias added to its logit before sampling (OpenAI's -100..100).
    logit_bias: dict[int, float] | None = None
    # Return the top-k logprobs of every prompt token too (vLLM's field; 0 = only the chosen).
    prompt_logprobs: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate(self) -> None:
        """Raise ValueError naming the offending field and the accepted range."""
        _check_int("n", self.n, low=1, high=MAX_N)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_float("top_p", self.top_p, high=1.0)
        if self.top_p <= 0.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, low=0)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_float("repetition_penalty", self.repetition_penalty, high=100.0)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None:
            _check_int("seed", self.seed, low=-(2**63), high=2**64 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError("stop must be a list of non-empty strings")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids[]", t, low=0)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_LOGPROBS)
        for token_id, bias in (self.logit_bias or {}).items():
            _check_int("logit_bias key", token_id, low=0)
            _check_float(f"logit_bias[{token_id}]", bias, low=-LOGIT_BIAS_LIMIT,
                         high=LOGIT_BIAS_LIMIT)


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    _check_range(name, value, low, high)


def _check_float(
    name: str, value: object, low: float | None = None, high: float | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    _check_range(name, value, low, high)


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
