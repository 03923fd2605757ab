"""Temperature, top-k, top-p and min-p as -inf masks over the logits.

Semantics (the reference is `top_k_top_p_sorted`): top-k keeps every logit >= the k-th largest
(ties at the k-th value stay); top-p then keeps the minimal prefix of the stably sorted
(descending, lowest id first among equal logits) top-k survivors whose probability mass reaches
p, i.e. every position whose mass before it is < p (so the first token always stays); min-p
drops tokens with p < min_p * p_max.

On CPU top-p does not sort the vocabulary. When every top-p row also has a top-k with exactly
k survivors, the cut is found among the k values `topk` already returned. Otherwise each row is
bucketed by logit into `_BUCKETS` value ranges, the bucket where the cumulative mass reaches p
is found from the bucket masses, and only that bucket is sorted. Masses are summed in float64,
so a decision can differ from the reference's (float32 softmax, whose sum is off by up to a few
1e-6 on a 32k row) only where a prefix mass lies that close to p. On CUDA the reference full sort
is used: it needs no host sync (the bucket's size is data-dependent, read on the host) and a
segmented GPU sort is cheap next to a forward pass. Random rows are then sampled from
`Truncated.weights` (0 where excluded) without materialising -inf logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmserve.engine.sampling_tensors import SamplingTensors

_NEG_INF = float("-inf")
# 64 value ranges: the bucket holding the cut is a few percent of the vocabulary even for a flat
# (random-weights) row, while the per-row bucket masses stay a tiny tensor.
_BUCKETS = 64
# Buckets span at most this far below the row's max (scaled logits): anything lower has a
# probability below e^-64 of the top token's and shares the last bucket.
_SPAN = 64.0
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class Truncated:
    """Random rows after temperature and truncation, in the form sampling wants.

    `weights` are unnormalised probabilities (exp(scaled - row max), 0 where excluded); `keep`
    is None when nothing was excluded beyond what is already -inf in `scaled`.
    """

    scaled: torch.Tensor
    keep: torch.Tensor | None
    weights: torch.Tensor

    def logits(self) -> torch.Tensor:
        """The truncated distribution as logits (-inf = excluded)."""
        return self.scaled if self.keep is None else self.scaled.masked_fill(~self.keep, _NEG_INF)


def apply_truncation(
    logits: torch.Tensor, st: SamplingTensors, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks, for the given rows (default all)."""
    return truncate(logits, st, rows).logits()


def truncate(
    logits: torch.Tensor, st: SamplingTensors, rows: torch.Tensor | None = None,
    masked: bool = False,
) -> Truncated:
    """Temperature, top-k, top-p and min-p for `logits` (the given rows of the batch).

    `masked`: some logits are -inf (grammar masks), which the exponential is told about.
    """

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else t.index_select(0, rows)

    top_k = pick(st.top_k)
    scaled = logits / pick(st.temperature)[:, None]
    if st.use_top_p and scaled.device.type != "cpu":
        # No host sync allowed: the reference full sort, then -inf masks throughout.
        out = top_k_top_p_sorted(scaled, top_k if st.max_top_k else None, pick(st.top_p))
        if st.use_min_p:
            cutoff = out.amax(dim=-1, keepdim=True) + torch.log(pick(st.min_p))[:, None]
            out = out.masked_fill(out < cutoff, _NEG_INF)
        return Truncated(out, None, (out - out.amax(dim=-1, keepdim=True)).exp_())
    mx = scaled.amax(dim=-1, keepdim=True)
    e = _exp_below_max(scaled, mx, masked)
    keep, kth, top = None, None, None
    if st.max_top_k:
        top = scaled.topk(st.max_top_k, dim=-1).values
        kth = top.gather(1, (top_k.clamp(1, st.max_top_k) - 1)[:, None])
        kth = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, _NEG_INF))
        keep = scaled >= kth  # ties at the k-th value stay
    if st.use_top_p:
        top_p = pick(st.top_p)
        kept = None
        if keep is not None and top is not None:
            kept = _top_p_in_top_k(scaled, keep, top, mx, top_k, top_p)
        if kept is None:
            kept = _top_p_keep(scaled, e if keep is None else e * keep, mx, kth, top_p)
        keep = kept if keep is None else keep & kept
    if st.use_min_p:
        # p < min_p * p_max  <=>  logit < max_logit + log(min_p); min_p = 0 gives -inf: no-op.
        min_p = scaled >= mx + torch.log(pick(st.min_p))[:, None]
        keep = min_p if keep is None else keep & min_p
    return Truncated(scaled, keep, e if keep is None else e * keep)


# exp(-87) is about the smallest normal float32; anything below it is 0 next to the max's 1.
_EXP_FLOOR = -87.0
_EXP_FLOOR_VALUE = math.exp(_EXP_FLOOR)


def _exp_below_max(scaled: torch.Tensor, mx: torch.Tensor, masked: bool) -> torch.Tensor:
    """exp(scaled - mx). On CPU a row full of -inf (a grammar mask) sends the vectorised exp
    down its slow special-value path (measured 0.39 ms against 0.07 ms for a 100k-vocab row,
    and underflowing to 0 is slower still). So masked rows are clamped at a floor whose exp is
    a normal float, and that value is subtracted again: masked tokens get exactly 0, and a
    weight above ~1e-31 is unchanged (the floor is far below its last bit)."""
    shifted = scaled - mx
    if not masked or shifted.device.type != "cpu":
        return shifted.exp_()
    return shifted.clamp_min_(_EXP_FLOOR).exp_().sub_(_EXP_FLOOR_VALUE).clamp_min_(0.0)


def top_k_top_p_sorted(
    x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p by a full stable sort of every row: no host sync (the CUDA path)."""
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    if top_k is not None:
        kth = sorted_x.gather(1, (top_k.clamp(1, x.shape[-1]) - 1)[:, None])
        kth = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, _NEG_INF))
        sorted_x = sorted_x.masked_fill(sorted_x < kth, _NEG_INF)
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exactly 0 for the first token: it always stays
    remove = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_x = sorted_x.masked_fill(remove, _NEG_INF)
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def top_p_buckets(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p alone on logits `x`, as -inf masks, without sorting the rows (CPU)."""
    mx = x.amax(dim=-1, keepdim=True)
    return x.masked_fill(~_top_p_keep(x, (x - mx).exp_(), mx, None, top_p), _NEG_INF)


def _top_p_in_top_k(
    x: torch.Tensor, keep_k: torch.Tensor, top: torch.Tensor, mx: torch.Tensor,
    top_k: torch.Tensor, top_p: torch.Tensor,
) -> torch.Tensor | None:  # fmt: skip
    """Top-p over the top-k values already found, or None when that is not exact (CPU).

    Exact when every top-p row has exactly k survivors (no ties past the k-th value) and the
    cut does not split a run of equal values; otherwise the bucket path decides.
    """
    on = top_p < 1.0
    k = top_k.clamp(min=1)
    if not bool(((keep_k.sum(dim=-1) == top_k) | ~on).all()):
        return None
    pos = torch.arange(top.shape[1])
    ev = torch.where(pos < k[:, None], (top - mx).double().exp(), 0.0)
    cum = ev.cumsum(dim=-1)
    before = cum - ev
    n = ((before < top_p.double()[:, None] * cum[:, -1:]) & (pos < k[:, None])).sum(dim=-1)
    v = top.gather(1, (n - 1)[:, None])
    after = top.gather(1, n.clamp(max=top.shape[1] - 1)[:, None])
    split = on & (n < k) & (after[:, 0] == v[:, 0])
    if bool(split.any()):
        return None
    return (x >= v) | ~on[:, None]


def _top_p_keep(
    x: torch.Tensor, e: torch.Tensor, mx: torch.Tensor, kth: torch.Tensor | None,
    top_p: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Which ids top-p keeps. `e`: unnormalised probabilities (0 for ids top-k dropped).

    Buckets by value, finds the bucket where the cumulative mass reaches p, and sorts only that
    bucket. Masses are summed in float64, so each decision is the exact one unless a mass lies
    within ~1e-12 of p. It reads the bucket sizes on the host: CPU only.
    """
    lo = torch.maximum(x.amin(dim=-1, keepdim=True), mx - _SPAN)
    if kth is not None:  # top-k survivors are >= kth: spend the buckets on them
        lo = torch.maximum(lo, kth)
    inv_width = 1.0 / ((mx - lo) / _BUCKETS).clamp_min_(_TINY)
    # Bucket 0 holds the largest logits. (mx - x) * inv_width is monotone in x, so a bucket is
    # a contiguous range of the sorted row and equal logits share one; it is >= 0, so the
    # conversion's truncation is a floor.
    bucket = ((mx - x) * inv_width).clamp_(max=_BUCKETS - 1).long()
    mass = torch.zeros(x.shape[0], _BUCKETS, dtype=torch.float64)
    mass = mass.scatter_add_(1, bucket, e.double()).cumsum_(dim=-1)
    pz = top_p.double()[:, None] * mass[:, -1:]  # mass p, unnormalised
    # The cut is in the first bucket whose cumulative mass reaches p: every id before it has a
    # mass before < p, every id after it has a mass before >= p.
    cut = (mass < pz).sum(dim=-1, keepdim=True)
    keep_all = (cut >= _BUCKETS) | (top_p[:, None] >= 1.0)
    cut.clamp_(max=_BUCKETS - 1)
    above = torch.where(cut > 0, mass.gather(1, (cut - 1).clamp(min=0)), 0.0)
    keep = bucket < cut
    in_cut = bucket == cut
    if bool(keep_all.any()):
        keep |= keep_all
        in_cut &= ~keep_all
    r, c = in_cut.nonzero(as_tuple=True)  # row-major: ids ascending within a row
    if len(r):
        keep[r, c] = _decide_in_bucket(x, e, r, c, above, pz)
    return keep


def _decide_in_bucket(
    x: torch.Tensor, e: torch.Tensor, r: torch.Tensor, c: torch.Tensor, above: torch.Tensor,
    pz: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Keep decisions for the ids (r, c) of each row's cut bucket, sorted as the reference."""
    counts = torch.bincount(r, minlength=x.shape[0])
    col = torch.arange(len(r)) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    shape = (x.shape[0], int(counts.max()))
    vals = x.new_full(shape, _NEG_INF)
    vals[r, col] = x[r, c]
    pe = torch.zeros(shape, dtype=torch.float64)
    pe[r, col] = e[r, c].double()
    # Stable: equal logits keep ascending ids, as in the reference order. Padding sorts last.
    order = vals.sort(dim=-1, descending=True, stable=True).indices
    pe = pe.gather(1, order)
    kept = (above + pe.cumsum(dim=-1) - pe) < pz
    return torch.empty_like(kept).scatter_(1, order, kept)[r, col]
