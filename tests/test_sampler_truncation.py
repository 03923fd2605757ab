"""Top-k / top-p / min-p without a full sort: identical masks to the full-sort reference."""

from __future__ import annotations

import pytest
import torch

from llmserve.engine.sampling_tensors import SamplingTensors
from llmserve.engine.sampling_truncation import (
    apply_truncation,
    top_k_top_p_sorted,
    top_p_buckets,
)

NEG_INF = float("-inf")


# --- the reference: the sampler's former implementation, a stable sort of every row ----------


def ref_truncation(
    x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    out = x / temperature[:, None]
    use_top_k = bool((top_k > 0).any())
    if bool((top_p < 1.0).any()):
        sorted_x, order = out.sort(dim=-1, descending=True, stable=True)
        if use_top_k:
            kth = sorted_x.gather(1, (top_k.clamp(1, x.shape[-1]) - 1)[:, None])
            kth = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, NEG_INF))
            sorted_x = sorted_x.masked_fill(sorted_x < kth, NEG_INF)
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        remove = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
        out = torch.empty_like(out).scatter_(1, order, sorted_x.masked_fill(remove, NEG_INF))
    elif use_top_k:
        kmax = int(top_k.max())
        kth = out.topk(kmax, dim=-1).values.gather(1, (top_k.clamp(1, kmax) - 1)[:, None])
        kth = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, NEG_INF))
        out = out.masked_fill(out < kth, NEG_INF)
    if bool((min_p > 0).any()):
        cutoff = out.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
        out = out.masked_fill(out < cutoff, NEG_INF)
    return out


def mass_before_by_id(x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, float]:
    """Float64 probability mass before each id in the reference order (after top-k), and how
    far the reference's float32 softmax is from summing to 1 (its own rounding error)."""
    if top_k > 0:
        kth = x.sort(descending=True).values[top_k - 1]
        x = x.masked_fill(x < kth, NEG_INF)
    s, order = x.double().sort(descending=True, stable=True)
    probs = s.softmax(-1)
    before = torch.empty_like(probs).scatter_(0, order, probs.cumsum(-1) - probs)
    ref_probs = x.sort(descending=True, stable=True).values.softmax(-1)  # as the reference
    return before, abs(float(ref_probs.double().sum()) - 1.0)


def sampling_tensors(temperature, top_k, top_p, min_p) -> SamplingTensors:
    n = len(temperature)
    z = torch.zeros(n)
    return SamplingTensors(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, presence=z, frequency=z,
        repetition=z + 1, random_rows=list(range(n)), rep_rows=[], pf_rows=[], blocked=([], []),
        logprob_rows=[], logprob_ks=[], seeded=[], max_top_k=int(top_k.max()),
        use_top_p=bool((top_p < 1).any()), use_min_p=bool((min_p > 0).any()),
    )  # fmt: skip


def check_same(x, temperature, top_k, top_p, min_p) -> int:
    """Assert the new masks equal the reference's; returns how many rows differ at all.

    Where they differ, the new mask must be the float64-exact one (up to 2e-6), and the token's
    mass before must lie within the reference's own float32 rounding of p. Kept logits are equal.
    """
    ref = ref_truncation(x, temperature, top_k, top_p, min_p)
    got = apply_truncation(x, sampling_tensors(temperature, top_k, top_p, min_p))
    both = (got > NEG_INF) & (ref > NEG_INF)
    assert torch.equal(got[both], ref[both])
    differ = (got > NEG_INF) != (ref > NEG_INF)
    rows = differ.any(-1).nonzero().flatten().tolist()
    for i in rows:
        before, ref_error = mass_before_by_id(x[i] / temperature[i], int(top_k[i]))
        p = float(top_p[i])
        near = (before[differ[i]] - p).abs()
        assert (near < 2e-6 + 2 * ref_error).all(), (i, near.max(), ref_error)
        exact = before[differ[i]] < p  # float64: kept iff the mass before is < p
        assert (((got[i][differ[i]] > NEG_INF) == exact) | (near < 2e-6)).all()
    return len(rows)


P_VALUES = [1e-6, 0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0]


def random_params(
    rows: int, vocab: int, gen: torch.Generator, with_top_k: bool | str, with_min_p: bool
):
    pick = torch.randint(len(P_VALUES), (rows,), generator=gen)
    top_p = torch.tensor(P_VALUES)[pick]
    top_k = torch.zeros(rows, dtype=torch.long)
    if with_top_k:
        # "all": every row has a top-k (the path that cuts top-p inside the top-k values)
        choices = torch.tensor([0, 1, 2, 5, 40, vocab // 3, vocab][with_top_k == "all" :])
        choices = choices.clamp(max=vocab)
        top_k = choices[torch.randint(len(choices), (rows,), generator=gen)]
    min_p = torch.zeros(rows)
    if with_min_p:
        min_p = torch.tensor([0.0, 0.01, 0.2])[torch.randint(3, (rows,), generator=gen)]
    temperature = torch.tensor([0.5, 1.0, 1.7])[torch.randint(3, (rows,), generator=gen)]
    return temperature, top_k, top_p, min_p


def logits_kind(kind: str, rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "flat":  # random-weights models: the nucleus is most of the vocabulary
        return torch.randn(rows, vocab, generator=gen)
    if kind == "peaked":  # trained models: a few tokens hold most of the mass
        return torch.randn(rows, vocab, generator=gen) * 4
    if kind == "ties":  # few distinct values: long runs of equal logits at every cut
        return torch.randint(-6, 6, (rows, vocab), generator=gen).float() * 0.5
    if kind == "masked":  # -inf entries, as grammar masks and min_tokens leave them
        x = torch.randint(-3, 3, (rows, vocab), generator=gen).float()
        drop = torch.rand(rows, vocab, generator=gen) < 0.5
        drop[torch.arange(rows), torch.randint(vocab, (rows,), generator=gen)] = False
        return x.masked_fill(drop, NEG_INF)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["flat", "peaked", "ties", "masked"])
@pytest.mark.parametrize(
    ("with_top_k", "with_min_p"), [(False, False), (True, False), ("all", False), (True, True)]
)
@pytest.mark.parametrize("vocab", [7, 300, 5000])
def test_truncation_equals_full_sort_reference(kind, with_top_k, with_min_p, vocab):
    gen = torch.Generator().manual_seed(vocab + 10 * bool(with_top_k) + 100 * with_min_p)
    x = logits_kind(kind, 96, vocab, gen)
    params = random_params(96, vocab, gen, with_top_k, with_min_p)
    # Rows that differ at all: only at p = 0.999.. with long runs of tiny probabilities.
    assert check_same(x, *params) <= 96 // 4


def test_bucket_path_ties_keep_the_lowest_ids():
    # Ten equal logits: p = 0.35 needs exactly the first four of them, i.e. ids 0..3.
    x = torch.zeros(1, 10)
    got = top_p_buckets(x, torch.tensor([0.35]))
    assert (got[0] > NEG_INF).nonzero().flatten().tolist() == [0, 1, 2, 3]
    # Ties straddling the cut after a larger value: 2.0 (p .60) first, then ids 0, 1, 3 (.08 each).
    x = torch.tensor([[0.0, 0.0, 2.0, 0.0, 0.0, 0.0]])
    ref = ref_truncation(x, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([0.8]),
                         torch.zeros(1))  # fmt: skip
    got = top_p_buckets(x, torch.tensor([0.8]))
    assert torch.equal(got, ref)
    assert (got[0] > NEG_INF).nonzero().flatten().tolist() == [0, 1, 2, 3]  # not 4, 5


def test_bucket_path_first_token_always_kept_and_p_one_untouched():
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    got = top_p_buckets(x, torch.tensor([1e-9, 1e-9, 1.0, 1.0]))
    assert ((got[:2] > NEG_INF).sum(-1) == 1).all()
    assert torch.equal(got[:2].argmax(-1), x[:2].argmax(-1))
    assert torch.equal(got[2:], x[2:])


def test_bucket_path_single_token_and_fully_equal_rows():
    assert torch.equal(
        top_p_buckets(torch.tensor([[3.0]]), torch.tensor([0.5])), torch.tensor([[3.0]])
    )
    x = torch.full((2, 64), 1.5)
    got = top_p_buckets(x, torch.tensor([0.5, 0.999]))
    assert (got[0] > NEG_INF).sum() == 32 and (got[1] > NEG_INF).sum() == 64


def test_sorted_path_is_the_reference():
    # The CUDA path: the same arithmetic as the reference, so bitwise equal on any input.
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 4, (64, 200), generator=gen).float()
    t, k, p, m = random_params(64, 200, gen, with_top_k=True, with_min_p=False)
    assert torch.equal(top_k_top_p_sorted(x, k, p), ref_truncation(x, torch.ones(64), k, p, m))


def test_rows_argument_picks_parameters_of_those_rows():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 400, generator=gen) * 3
    t, k, p, m = random_params(6, 400, gen, with_top_k=True, with_min_p=True)
    rows = torch.tensor([4, 1])
    got = apply_truncation(x.index_select(0, rows), sampling_tensors(t, k, p, m), rows)
    ref = ref_truncation(x, t, k, p, m).index_select(0, rows)
    assert torch.equal(got, ref)


def test_top_p_cut_inside_a_run_of_equal_top_k_values():
    # top_k = 4 keeps {3, 3, 3, 1} exactly; p = 0.5 needs two of the three 3.0s: ids 1 and 2.
    x = torch.tensor([[0.0, 3.0, 3.0, 3.0, 1.0, -1.0], [0.0, 3.0, 2.5, 3.5, 1.0, -1.0]])
    t, k, p, m = torch.ones(2), torch.tensor([4, 4]), torch.tensor([0.5, 0.5]), torch.zeros(2)
    got = apply_truncation(x, sampling_tensors(t, k, p, m))
    assert torch.equal(got, ref_truncation(x, t, k, p, m))
    assert (got[0] > NEG_INF).nonzero().flatten().tolist() == [1, 2]


def test_masked_rows_exponentiate_to_exact_zeros_and_unchanged_weights():
    from llmserve.engine.sampling_truncation import _exp_below_max

    torch.manual_seed(0)
    x = torch.randn(3, 1000) * 30  # a wide range: some weights far below the max
    x[:, ::3] = float("-inf")  # a grammar mask
    mx = x.amax(-1, keepdim=True)
    ref = (x - mx).exp()
    got = _exp_below_max(x.clone(), mx, masked=True)
    assert (got[:, ::3] == 0).all()
    big = ref > 1e-30
    assert torch.equal(got[big], ref[big])
    assert (got[~big] <= 1e-30).all()
