"""Sampler: one token per logits row, vectorised over the batch.

Order (as vLLM and OpenAI define it): min_tokens -> repetition penalty -> presence/frequency
penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> Gumbel-max sample.
Logprobs come from the raw model logits (before any processing), vLLM's default. Everything stays
on the logits' device; the results cross to the host in one transfer at the end.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import torch

from llmserve.outputs import Logprob

if TYPE_CHECKING:
    from llmserve.engine.request import Request

_NEG_INF = float("-inf")
# Exponential noise of exactly 0 would make a zero-probability token 0/0 = NaN, which argmax picks.
_MIN_NOISE = torch.finfo(torch.float32).tiny


@dataclass
class SamplerOutput:
    """Per row: the sampled token id, and its logprobs dict when the request asked for them."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]


@dataclass
class SamplingTensors:
    """Per-row parameters as device tensors (built in one construction) plus host-side flags."""

    temperature: torch.Tensor  # [B]; 1.0 on greedy rows so the division is harmless
    top_k: torch.Tensor  # [B] long; 0 = off
    top_p: torch.Tensor  # [B]
    min_p: torch.Tensor  # [B]
    presence: torch.Tensor  # [B]
    frequency: torch.Tensor  # [B]
    repetition: torch.Tensor  # [B]
    random_rows: list[int]
    rep_rows: list[int]  # rows with repetition_penalty != 1
    pf_rows: list[int]  # rows with a presence or frequency penalty
    blocked: tuple[list[int], list[int]]  # (row, token id) pairs that min_tokens forbids
    logprob_rows: list[int]
    max_top_k: int  # largest enabled top_k (0 if none)
    use_top_p: bool
    use_min_p: bool

    @classmethod
    def from_requests(
        cls, requests: list[Request], vocab: int, device: torch.device
    ) -> SamplingTensors:
        """Gather every row's SamplingParams; one host-to-device copy for all of them."""
        values, greedy = [], []
        for r in requests:
            sp = r.sampling_params
            # top_k == 1 is greedy by definition; taking argmax also makes ties resolve the same.
            g = sp.greedy or sp.top_k == 1
            greedy.append(g)
            values.append(
                (1.0 if g else sp.temperature, min(sp.top_k, vocab), sp.top_p, sp.min_p,
                 sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty)
            )  # fmt: skip
        t = _to_device(values, torch.float32, device).reshape(len(requests), 7).T
        sps = [r.sampling_params for r in requests]
        random_rows = [i for i, g in enumerate(greedy) if not g]
        return cls(
            temperature=t[0], top_k=t[1].long(), top_p=t[2], min_p=t[3],
            presence=t[4], frequency=t[5], repetition=t[6],
            random_rows=random_rows,
            rep_rows=[i for i, sp in enumerate(sps) if sp.repetition_penalty != 1.0],
            pf_rows=[i for i, sp in enumerate(sps)
                     if sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0],
            blocked=_min_tokens_blocked(requests, vocab),
            logprob_rows=[i for i, sp in enumerate(sps) if sp.logprobs is not None],
            max_top_k=max((min(sps[i].top_k, vocab) for i in random_rows), default=0),
            use_top_p=any(sps[i].top_p < 1.0 for i in random_rows),
            use_min_p=any(sps[i].min_p > 0.0 for i in random_rows),
        )  # fmt: skip

    @property
    def needs_penalties(self) -> bool:
        return bool(self.rep_rows or self.pf_rows or self.blocked[0])


def _to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> tensor on `device` without waiting for queued GPU work (pinned, async copy)."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _min_tokens_blocked(requests: list[Request], vocab: int) -> tuple[list[int], list[int]]:
    """(rows, ids) of the stop tokens that may not be sampled yet because of min_tokens.

    Like vLLM, eos ids are not blocked when ignore_eos is set (they do not stop the request then).
    """
    rows: list[int] = []
    ids: list[int] = []
    for i, r in enumerate(requests):
        sp = r.sampling_params
        if r.num_output_tokens >= sp.min_tokens:
            continue
        stops = set(sp.stop_token_ids or ())
        if not sp.ignore_eos:
            stops |= set(r.eos_token_ids)
        kept = [t for t in sorted(stops) if 0 <= t < vocab]
        rows += [i] * len(kept)
        ids += kept
    return rows, ids


def _token_counts(
    seqs: list[list[int]], rows: list[int], batch: int, vocab: int, device: torch.device
) -> torch.Tensor:
    """[batch, vocab] float counts of each token id in `seqs[j]`, placed at row `rows[j]`."""
    counts = torch.zeros(batch, vocab + 1, device=device)
    flat = list(chain.from_iterable(seqs))
    if flat:
        # Out-of-range ids land in the spare last column, which is dropped: no device assert.
        ids = _to_device(flat, torch.long, device).clamp_(0, vocab)
        lengths = _to_device([len(s) for s in seqs], torch.long, device)
        row_ids = torch.repeat_interleave(
            _to_device(rows, torch.long, device), lengths, output_size=len(flat)
        )
        counts.index_put_((row_ids, ids), torch.ones_like(ids, dtype=counts.dtype), accumulate=True)
    return counts[:, :vocab]


def apply_penalties(
    logits: torch.Tensor, requests: list[Request], st: SamplingTensors | None = None
) -> torch.Tensor:
    """min_tokens, repetition, presence and frequency penalties; returns a new tensor.

    Repetition (HF/vLLM): over prompt and output tokens, positive logits are divided by the
    penalty and negative ones multiplied. Presence/frequency (OpenAI): over output tokens only,
    logit -= presence * (count > 0) + frequency * count.
    """
    batch, vocab = logits.shape
    st = st or SamplingTensors.from_requests(requests, vocab, logits.device)
    out = logits.clone()
    rows, ids = st.blocked
    if rows:
        index = _to_device([rows, ids], torch.long, logits.device)
        out[index[0], index[1]] = _NEG_INF
    if st.rep_rows:
        seqs = [requests[i].all_token_ids for i in st.rep_rows]
        seen = _token_counts(seqs, st.rep_rows, batch, vocab, logits.device) > 0
        rep = st.repetition[:, None]
        out = torch.where(seen, torch.where(out > 0, out / rep, out * rep), out)
    if st.pf_rows:
        seqs = [requests[i].output_token_ids for i in st.pf_rows]
        counts = _token_counts(seqs, st.pf_rows, batch, vocab, logits.device)
        out = out - st.presence[:, None] * (counts > 0) - st.frequency[:, None] * counts
    return out


def apply_truncation(
    logits: torch.Tensor, st: SamplingTensors, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks, for the given rows (default all)."""

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else t.index_select(0, rows)

    top_k = pick(st.top_k)
    out = logits / pick(st.temperature)[:, None]
    if st.use_top_p:
        out = _top_k_top_p(out, top_k if st.max_top_k else None, pick(st.top_p))
    elif st.max_top_k:
        kth = out.topk(st.max_top_k, dim=-1).values.gather(
            1, (top_k.clamp(1, st.max_top_k) - 1)[:, None]
        )
        out = _mask_below(out, kth, top_k)
    if st.use_min_p:
        # p < min_p * p_max  <=>  logit < max_logit + log(min_p); min_p = 0 gives -inf: no-op.
        cutoff = out.amax(dim=-1, keepdim=True) + torch.log(pick(st.min_p))[:, None]
        out = out.masked_fill(out < cutoff, _NEG_INF)
    return out


def _mask_below(x: torch.Tensor, kth: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Mask entries below each row's k-th largest value (ties at the k-th value are kept)."""
    kth = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, _NEG_INF))
    return x.masked_fill(x < kth, _NEG_INF)


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p (the minimal prefix of sorted probabilities whose mass reaches p)."""
    # Stable sort: among equal logits the lowest id comes first, as with argmax.
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    if top_k is not None:
        kth = sorted_x.gather(1, (top_k.clamp(1, x.shape[-1]) - 1)[:, None])
        sorted_x = _mask_below(sorted_x, kth, top_k)
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exactly 0 for the first token: it always stays
    remove = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_x = sorted_x.masked_fill(remove, _NEG_INF)
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def process_logits(
    logits: torch.Tensor, requests: list[Request], vocab_size: int | None = None
) -> torch.Tensor:
    """The distribution each row samples from, as logits (-inf = excluded); for inspection.

    Greedy rows get penalised logits (their argmax is the token); random rows also get
    temperature and truncation applied.
    """
    logits = logits[:, :vocab_size].float()
    st = SamplingTensors.from_requests(requests, logits.shape[1], logits.device)
    out = apply_penalties(logits, requests, st)
    if st.random_rows:
        rows = _to_device(st.random_rows, torch.long, logits.device)
        out[rows] = apply_truncation(out.index_select(0, rows), st, rows)
    return out


class Sampler:
    """Samples one token per row. `vocab_size` (optional) hides padded logits columns from
    sampling; logprobs still use the full row, as transformers' log_softmax would."""

    def __init__(self, vocab_size: int | None = None) -> None:
        self.vocab_size = vocab_size
        # Seeded requests carry a CPU generator; on another device each gets a twin seeded from it.
        self._twins: weakref.WeakKeyDictionary[Request, torch.Generator] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """Sample `logits[i]` ([batch, vocab] float) for `requests[i]`."""
        _check_inputs(logits, requests)
        if not requests:
            return SamplerOutput([], [])
        raw = logits.float()
        visible = raw[:, : self.vocab_size]
        if all(_plain_greedy(r) for r in requests):
            return SamplerOutput(visible.argmax(dim=-1).tolist(), [None] * len(requests))
        st = SamplingTensors.from_requests(requests, visible.shape[1], raw.device)
        penalised = apply_penalties(visible, requests, st) if st.needs_penalties else visible
        tokens = self._choose(penalised, requests, st)
        parts = [tokens.double()]
        if st.logprob_rows:
            parts += _logprob_parts(raw, tokens, requests, st.logprob_rows)
        host = torch.cat(parts).cpu().tolist()  # the one device-to-host transfer
        token_ids = [int(t) for t in host[: len(requests)]]
        logprobs = _unpack_logprobs(host[len(requests) :], token_ids, requests, st.logprob_rows)
        return SamplerOutput(token_ids, logprobs)

    def _choose(
        self, penalised: torch.Tensor, requests: list[Request], st: SamplingTensors
    ) -> torch.Tensor:
        """Greedy rows take the argmax; random rows are truncated and sampled."""
        if not st.random_rows:
            return penalised.argmax(dim=-1)
        if len(st.random_rows) == len(requests):
            return self._sample(apply_truncation(penalised, st), requests, st.random_rows)
        rows = _to_device(st.random_rows, torch.long, penalised.device)
        sampled = self._sample(
            apply_truncation(penalised.index_select(0, rows), st, rows), requests, st.random_rows
        )
        return penalised.argmax(dim=-1).index_copy_(0, rows, sampled)

    def _sample(
        self, logits: torch.Tensor, requests: list[Request], rows: list[int]
    ) -> torch.Tensor:
        """Gumbel-max via exponential noise: argmax(p / E), E ~ Exp(1). No host sync.

        A seeded row draws its noise from its own generator only, so its samples do not depend
        on batch mates or on its row position.
        """
        probs = logits.softmax(dim=-1)
        seeded = [(j, requests[i]) for j, i in enumerate(rows) if requests[i].generator is not None]
        noise = torch.empty_like(probs)
        if len(seeded) < len(rows):
            noise.exponential_()  # one batched draw for every unseeded row
        for j, req in seeded:
            noise[j].exponential_(generator=self._generator(req, probs.device))
        return probs.div_(noise.clamp_min_(_MIN_NOISE)).argmax(dim=-1)

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
        and r.num_output_tokens >= sp.min_tokens
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


def _logprob_parts(
    raw: torch.Tensor, tokens: torch.Tensor, requests: list[Request], rows: list[int]
) -> list[torch.Tensor]:
    """Chosen logprob, its 1-based rank, and the top-k values/ids (k = max asked), flattened."""
    idx = _to_device(rows, torch.long, raw.device)
    lp = torch.log_softmax(raw.index_select(0, idx), dim=-1)
    chosen = lp.gather(1, tokens.index_select(0, idx)[:, None])
    rank = (lp > chosen).sum(dim=-1) + 1
    k = max(requests[i].sampling_params.logprobs or 0 for i in rows)
    top_v, top_i = lp.topk(k, dim=-1)
    return [
        chosen.squeeze(1).double(),
        rank.double(),
        top_v.double().flatten(),
        top_i.double().flatten(),
    ]


def _unpack_logprobs(
    flat: list[float], token_ids: list[int], requests: list[Request], rows: list[int]
) -> list[dict[int, Logprob] | None]:
    out: list[dict[int, Logprob] | None] = [None] * len(requests)
    if not rows:
        return out
    n = len(rows)
    k = (len(flat) - 2 * n) // (2 * n)
    chosen, ranks = flat[:n], flat[n : 2 * n]
    top_v, top_i = flat[2 * n : 2 * n + n * k], flat[2 * n + n * k :]
    for j, i in enumerate(rows):
        d = {token_ids[i]: Logprob(chosen[j], int(ranks[j]))}
        for r in range(requests[i].sampling_params.logprobs or 0):
            d.setdefault(int(top_i[j * k + r]), Logprob(top_v[j * k + r], r + 1))
        out[i] = d
    return out
