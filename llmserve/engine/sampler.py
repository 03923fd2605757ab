"""Sampler: one token per logits row, vectorised over the batch.

Order (as vLLM and OpenAI define it): logit_bias -> grammar bitmask (constrained rows only) ->
min_tokens -> repetition penalty -> presence/frequency
penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample. Logprobs come
from the raw model logits (before any processing), vLLM's default. `Sampler.sample` does all the
device work without a host sync and returns a `PendingSample`; its `to_host()` makes the one
device-to-host transfer, so an engine can launch the next step before it reads the tokens.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmserve.engine.host_staging import HostStaging
from llmserve.engine.sampling_constraints import apply_constraints, has_constraints
from llmserve.engine.sampling_logprobs import logprob_parts, unpack_logprobs
from llmserve.engine.sampling_penalties import TokenHistory, apply_penalties
from llmserve.engine.sampling_tensors import SamplingTensors, stop_ids_to_block, to_device
from llmserve.engine.sampling_truncation import apply_truncation, truncate
from llmserve.kernels.cpu_fused import row_argmax as argmax
from llmserve.outputs import Logprob

if TYPE_CHECKING:
    from llmserve.engine.request import Request
    from llmserve.structured.masks import GrammarMasks

__all__ = [
    "PendingSample",
    "Sampler",
    "SamplerOutput",
    "SamplingTensors",
    "apply_penalties",
    "apply_truncation",
    "needs_output_history",
    "process_logits",
]

# Exponential noise of exactly 0 would make a zero-probability token 0/0 = NaN, which argmax picks.
_MIN_NOISE = torch.finfo(torch.float32).tiny
# CPU: logits per chunk of random rows (1 MiB of float32, within a core's L2).
_CHUNK_ELEMENTS = 1 << 18


@dataclass
class SamplerOutput:
    """Per row: the sampled token id, and its logprobs dict when the request asked for them."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]


class PendingSample:
    """A step's sampled tokens, still on the device, and their transfer to the host under way.

    `token_ids` ([B] int64 on the logits' device) can feed the next step on the device at once.
    On CUDA the copy into pinned host memory starts at construction and an event marks its end,
    so `to_host()` waits only for that copy (and the work queued before it).
    """

    def __init__(
        self, token_ids: torch.Tensor, packed: torch.Tensor, rows: list[int], ks: list[int],
        staging: HostStaging | None = None,
    ) -> None:
        self.token_ids = token_ids
        self._rows, self._ks = rows, ks
        self._event: torch.cuda.Event | None = None
        self._result: SamplerOutput | None = None
        self._packed = packed  # kept alive until the copy is read
        self._host = packed
        if packed.device.type == "cuda":
            # From the sampler's two alternating pinned buffers, not a fresh pinned allocation
            # per step: the engine reads step N before it samples step N + 2.
            self._host = (staging.host_buffer("sampled", packed.numel(), packed.dtype)
                          if staging is not None
                          else torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True))
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def to_host(self) -> SamplerOutput:
        """Token ids and logprobs as Python objects (waits for the device if needed)."""
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            flat = self._host.tolist()
            n = self.token_ids.shape[0]
            token_ids = [int(t) for t in flat[:n]] if self._rows else flat
            logprobs = unpack_logprobs(flat[n:], token_ids, self._rows, self._ks)
            self._result = SamplerOutput(token_ids, logprobs)
            self._packed = self._host = None  # type: ignore[assignment]
        return self._result


def needs_output_history(request: Request) -> bool:
    """True when the next token's distribution depends on the request's previous outputs.

    Penalties read the output tokens; min_tokens blocks stop ids until enough outputs exist.
    A step with such a row must not be sampled before the previous step's tokens are appended.
    """
    sp = request.sampling_params
    if sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0:
        return True
    return len(request.output_token_ids) < sp.min_tokens and bool(stop_ids_to_block(request))


def process_logits(
    logits: torch.Tensor, requests: list[Request], vocab_size: int | None = None
) -> torch.Tensor:
    """The distribution each row samples from, as logits (-inf = excluded); for inspection.

    Greedy rows get penalised logits (their argmax is the token); random rows also get
    temperature and truncation applied.
    """
    logits = logits[:, :vocab_size].float().clone()
    apply_constraints(logits, requests, None)
    st = SamplingTensors.from_requests(requests, logits.shape[1], logits.device)
    out = apply_penalties(logits, requests, st)
    if st.random_rows:
        rows = to_device(st.random_rows, torch.long, logits.device)
        out[rows] = apply_truncation(out.index_select(0, rows), st, rows)
    return out


class Sampler:
    """Samples one token per row. `vocab_size` (optional) hides padded logits columns from
    sampling; logprobs still use the full row, as transformers' log_softmax would."""

    def __init__(self, vocab_size: int | None = None) -> None:
        self.vocab_size = vocab_size
        self._history = TokenHistory()
        self._staging: HostStaging | None = None  # pinned buffers for results, on CUDA
        # Seeded requests carry a CPU generator; on another device each gets a twin seeded from it.
        self._twins: weakref.WeakKeyDictionary[Request, torch.Generator] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """Sample `logits[i]` ([batch, vocab] float) for `requests[i]`, as host values."""
        return self.sample(logits, requests).to_host()

    def sample(self, logits: torch.Tensor, requests: list[Request],
               masks: GrammarMasks | None = None) -> PendingSample:
        """Sample on the device without waiting for it; what it needs from `requests` is copied.

        `masks` (from `llmserve.structured.grammar_masks`) restricts the constrained rows.

        On CPU this runs on torch's threads as they are: switching to one thread right after
        the LM-head GEMM cost more than it saved (measured on 2 cores at 64 sequences, top-p/
        top-k sampling made 1,330 output tok/s with the switch and 1,760 without, and 254-1,038
        against 1,850 with two busy processes beside it).
        """
        _check_inputs(logits, requests)
        if logits.device.type == "cuda":
            if self._staging is None:
                self._staging = HostStaging(logits.device)
            self._staging.next_step()
        if not requests:
            empty = torch.empty(0, dtype=torch.long, device=logits.device)
            return PendingSample(empty, empty, [], [], self._staging)
        raw = logits.float()
        visible = raw[:, : self.vocab_size]
        if has_constraints(requests, masks):
            # On a copy: logprobs come from the raw logits, and the caller's stay untouched.
            visible = visible.clone()
            apply_constraints(visible, requests, masks)
        if all(_plain_greedy(r) for r in requests):
            tokens = argmax(visible)
            return PendingSample(tokens, tokens, [], [], self._staging)
        st = SamplingTensors.from_requests(requests, visible.shape[1], raw.device)
        penalised = (
            apply_penalties(visible, requests, st, self._history) if st.needs_penalties else visible
        )
        tokens = self._choose(penalised, st, masks is not None)
        if not st.logprob_rows:
            return PendingSample(tokens, tokens, [], [], self._staging)
        parts = [tokens.double(), *logprob_parts(raw, tokens, st.logprob_rows, st.logprob_ks)]
        return PendingSample(tokens, torch.cat(parts), st.logprob_rows, st.logprob_ks,
                             self._staging)

    @staticmethod
    def plain_greedy(requests: list[Request], masks: object | None = None) -> bool:
        """Whether every row's token is the plain argmax of its raw logits: greedy, no
        logprobs, penalties, logit bias, pending min_tokens or grammar (`masks` None)."""
        return (bool(requests) and not has_constraints(requests, masks)
                and all(_plain_greedy(r) for r in requests))

    def _choose(self, penalised: torch.Tensor, st: SamplingTensors,
                masked: bool = False) -> torch.Tensor:
        """Greedy rows take the argmax; random rows are truncated and sampled.

        On CPU the random rows go in chunks of about `_CHUNK_ELEMENTS`
        logits, so the dozen vocab-wide temporaries of truncation stay in the core's cache
        (measured 2-3x at batch 64-256).
        """
        batch, vocab = penalised.shape
        random = st.random_rows
        if not random:
            return argmax(penalised)
        step = len(random)
        if penalised.device.type == "cpu":
            step = max(1, _CHUNK_ELEMENTS // vocab)
        seeded = dict(st.seeded)
        every_row = len(random) == batch
        parts = []
        for start in range(0, len(random), step):
            chunk = random[start : start + step]
            if every_row and len(chunk) == batch:
                rows, logits = None, penalised
            elif every_row:  # a contiguous slice: a view, no copy
                rows = torch.arange(start, start + len(chunk), device=penalised.device)
                logits = penalised[start : start + len(chunk)]
            else:
                rows = to_device(chunk, torch.long, penalised.device)
                logits = penalised.index_select(0, rows)
            chunk_seeded = [(j, seeded[row]) for j, row in enumerate(chunk) if row in seeded]
            weights = truncate(logits, st, rows, masked).weights
            parts.append(self._sample(weights, chunk_seeded))
        sampled = parts[0] if len(parts) == 1 else torch.cat(parts)
        if every_row:
            return sampled
        rows = to_device(random, torch.long, penalised.device)
        return argmax(penalised).index_copy_(0, rows, sampled)

    def _sample(self, weights: torch.Tensor, seeded: list[tuple[int, Request]]) -> torch.Tensor:
        """One token per row of `weights` (unnormalised probabilities). No host sync.

        Unseeded rows: inverse CDF with one uniform per row (O(vocab) adds, not a random number
        per vocab entry). A seeded row (`seeded`: its index here, its request) draws Gumbel-max
        noise (argmax p / E, E ~ Exp(1)) from its own generator only, so its samples do not
        depend on batch mates or on its row position.
        """
        cdf = weights.cumsum(dim=-1)
        total = cdf[:, -1:]
        u = torch.rand_like(total)
        # target < total, so some cdf entry exceeds it; right=True never lands on a zero weight.
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
        for j, req in seeded:
            noise = torch.empty_like(weights[j]).exponential_(
                generator=self._generator(req, weights.device)
            )
            probs = weights[j] / total[j]
            tokens[j] = probs.div_(noise.clamp_min_(_MIN_NOISE)).argmax()
        return tokens

    def _generator(self, req: Request, device: torch.device) -> torch.Generator:
        gen = req.generator
        assert gen is not None  # only seeded rows get here
        if gen.device.type == device.type and (device.type == "cpu" or gen.device == device):
            return gen
        twin = self._twins.get(req)
        if twin is None:
            twin = torch.Generator(device=device)
            twin.manual_seed(gen.initial_seed())
            self._twins[req] = twin
        return twin


def _plain_greedy(r: Request) -> bool:
    sp = r.sampling_params
    return (
        (sp.greedy or sp.top_k == 1)
        and sp.logprobs is None
        and sp.repetition_penalty == 1.0
        and sp.presence_penalty == 0.0
        and sp.frequency_penalty == 0.0
        and len(r.output_token_ids) >= sp.min_tokens
    )


def _check_inputs(logits: torch.Tensor, requests: list[Request]) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a 2-D tensor [batch, vocab]")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[0] != len(requests):
        raise ValueError(
            f"logits has {logits.shape[0]} rows but {len(requests)} requests were given"
        )
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocab dimension")
