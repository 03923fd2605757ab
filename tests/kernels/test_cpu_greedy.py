"""Exact greedy tokens from the bfloat16 screen (`llmserve.kernels.cpu_greedy`): the argmax of
the exact logits for every row, ties to the first index, and the float32 path for the rows the
screen hands back."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from llmserve.kernels import cpu_greedy, cpu_native
from llmserve.kernels.cpu_greedy import MAX_CANDIDATES, GreedyHead

pytestmark = pytest.mark.skipif(
    cpu_greedy.blocker(torch.zeros(2, 2)) is not None,
    reason=f"greedy screen unavailable here: {cpu_greedy.blocker(torch.zeros(2, 2))}")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The argmax of the float64 logits, first index among equal maxima."""
    return (hidden.double() @ weight.double().t()).max(dim=-1).indices


class CountingLogits:
    """The float32 logits the head falls back to, counting the rows it is asked for."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.rows = weight, 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.rows += hidden.shape[0]
        return F.linear(hidden, self.weight)


@pytest.mark.parametrize("rows", [0, 1, 5, 64, 300])
@pytest.mark.parametrize("vocab,dim", [(1000, 64), (4099, 256), (32000, 256), (517, 16)])
def test_tokens_are_the_exact_argmax(rows, vocab, dim):
    g = gen(rows * 7 + vocab + dim)
    weight = torch.randn(vocab, dim, generator=g) * 0.15
    hidden = torch.randn(rows, dim, generator=g) * 3.0
    logits = CountingLogits(weight)
    head = GreedyHead(weight, logits)
    got = head(hidden)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, exact_argmax(hidden, weight))
    assert logits.rows == 0  # random logits never need the float32 fallback
    # The float32 LM head agrees wherever its rounding cannot swap the two best (all rows here).
    assert torch.equal(got, F.linear(hidden, weight).max(dim=-1).indices)


@pytest.mark.parametrize("prepacked", [True, False])
def test_the_error_bound_holds_for_the_bfloat16_gemm(prepacked, monkeypatch):
    """The constant c is what the screen relies on: check it against oneDNN's actual results
    (the prepacked GEMM the head uses, and the plain one it falls back to), with wide dot
    products (dim 4096) where accumulation error matters most."""
    if not prepacked:
        monkeypatch.setattr(cpu_greedy, "_prepack", lambda weight: None)
    for dim, scale in ((256, 1.0), (4096, 1.0), (1024, 1e-3), (1024, 1e3)):
        g = gen(dim)
        weight = torch.randn(2000, dim, generator=g) * scale
        hidden = torch.randn(16, dim, generator=g).abs() * scale  # same signs: no cancellation
        head = GreedyHead(weight, CountingLogits(weight))
        assert (head.packed is None) == (head.weight_bf16 is not None)
        approx = head.approx_logits(hidden.to(torch.bfloat16)).double()
        exact = hidden.double() @ weight.double().t()
        bound = cpu_greedy.error_factor(dim) * hidden.double().norm(dim=1, keepdim=True) \
            * weight.double().norm(dim=1)
        assert bool(((approx - exact).abs() <= bound).all())


def test_ties_go_to_the_first_index_and_near_ties_to_the_exact_winner():
    g = gen(3)
    weight = torch.randn(4000, 128, generator=g) * 0.1
    hidden = torch.randn(8, 128, generator=g)
    best = exact_argmax(hidden, weight)
    # Exact ties: the winning row copied to a lower index wins there, as torch.max would.
    tied = weight.clone()
    tied[:5] = weight[best[0]]
    head = GreedyHead(tied, CountingLogits(tied))
    assert int(head(hidden[:1])) == 0
    # Near ties far below bfloat16's resolution: a copy scaled by 1 + 2^-20 must win.
    near = weight.clone()
    for r in range(8):
        near[r * 10] = weight[best[r]] * (1 + 2.0**-20)
    got = GreedyHead(near, CountingLogits(near))(hidden)
    assert torch.equal(got, exact_argmax(hidden, near))
    assert torch.equal(got, torch.arange(8) * 10)


def test_rows_the_screen_cannot_decide_take_the_float32_path():
    g = gen(4)
    weight = torch.randn(3000, 64, generator=g)
    weight[1000:1000 + 2 * MAX_CANDIDATES] = weight[7]  # far more equal candidates than allowed
    hidden = torch.randn(6, 64, generator=g)
    hidden[0] = 0.0  # every logit 0: all candidates; torch picks index 0
    hidden[1, 3] = float("nan")  # NaN logits: torch's max picks the first NaN, index 0
    hidden[2] = weight[7] * 1e36  # logits past float32's range: the float32 path decides
    hidden[3] = weight[7] * 10.0  # row 7 and its 2 * MAX_CANDIDATES copies tie for the top
    logits = CountingLogits(weight)
    got = GreedyHead(weight, logits)(hidden)
    want = F.linear(hidden, weight).max(dim=-1).indices
    assert torch.equal(got, want)
    assert logits.rows == 4
    assert int(got[3]) == 7
    assert torch.equal(got[4:], exact_argmax(hidden[4:], weight))


def test_one_and_two_threads_give_the_same_tokens():
    g = gen(5)
    weight = torch.randn(32000, 64, generator=g) * 0.2
    hidden = torch.randn(128, 64, generator=g)
    head = GreedyHead(weight, CountingLogits(weight))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = head(hidden)
        torch.set_num_threads(2)
        two = head(hidden)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, exact_argmax(hidden, weight))


def test_strided_hidden_rows_are_read_as_given():
    g = gen(6)
    weight = torch.randn(700, 32, generator=g)
    wide = torch.randn(9, 48, generator=g)
    hidden = wide[:, 8:40]
    assert torch.equal(GreedyHead(weight, CountingLogits(weight))(hidden),
                       exact_argmax(hidden, weight))


def test_the_portable_build_gives_the_same_tokens(tmp_path, monkeypatch):
    """The C source has an AVX-512 scan and a portable one: build the portable one (no
    -march=native) and check it against the exact argmax too."""
    library = cpu_native.build(tmp_path, cpu_greedy.SOURCE,
                               flag_sets=(cpu_native.FLAGS + ("-fopenmp",),))
    fn = ctypes.CDLL(str(library)).llmserve_screen_argmax_bf16
    fn.argtypes, fn.restype = cpu_greedy._ARGTYPES, ctypes.c_int64
    monkeypatch.setattr(cpu_greedy, "load", lambda: fn)
    g = gen(7)
    weight = torch.randn(4099, 64, generator=g) * 0.15
    hidden = torch.randn(40, 64, generator=g) * 2
    hidden[0] = 0.0
    logits = CountingLogits(weight)
    got = GreedyHead(weight, logits)(hidden)
    assert torch.equal(got[1:], exact_argmax(hidden[1:], weight))
    assert int(got[0]) == 0 and logits.rows == 1


def test_bad_weights_and_inputs_raise():
    with pytest.raises(ValueError, match="non-finite"):
        GreedyHead(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), lambda h: h)
    with pytest.raises(ValueError, match="float32"):
        GreedyHead(torch.zeros(4, 4, dtype=torch.float64), lambda h: h)
    with pytest.raises(ValueError, match="vocabulary"):
        GreedyHead(torch.zeros(cpu_greedy.MAX_VOCAB + 1, 1), lambda h: h)
    head = GreedyHead(torch.ones(4, 8), lambda h: h)
    with pytest.raises(ValueError, match="rows of 8"):
        head(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="rows of 8"):
        head(torch.zeros(2, 8, dtype=torch.float64))


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(cpu_greedy.ENV_SWITCH, "0")
    assert "switched off" in cpu_greedy.blocker(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="switched off"):
        GreedyHead(torch.zeros(4, 4), lambda h: h)


@pytest.mark.parametrize("rows", [1, 64, 256, 257, 600])
def test_prepacked_gemm_equals_the_plain_one(rows):
    """oneDNN's prepacked LM head (in slices of PACKED_MAX_ROWS rows) gives the plain bfloat16
    GEMM's bits, so the error bound and the tokens do not depend on which one ran."""
    g = gen(rows)
    weight = torch.randn(3000, 256, generator=g) * 0.1
    hidden = torch.randn(rows, 256, generator=g).to(torch.bfloat16)
    head = GreedyHead(weight, lambda h: F.linear(h, weight))
    if head.packed is None:
        pytest.skip("this torch cannot prepack a bfloat16 weight for oneDNN")
    assert head.weight_bf16 is None  # no second copy of the LM head
    got = head.approx_logits(hidden)
    assert got.shape == (rows, 3000) and got.dtype == torch.bfloat16
    assert torch.equal(got, F.linear(hidden, weight.to(torch.bfloat16)))


def test_without_prepacking_the_head_uses_the_plain_gemm(monkeypatch):
    monkeypatch.setattr(cpu_greedy, "_prepack", lambda weight: None)
    g = gen(11)
    weight = torch.randn(5000, 64, generator=g) * 0.2
    hidden = torch.randn(40, 64, generator=g)
    head = GreedyHead(weight, CountingLogits(weight))
    assert head.packed is None and head.weight_bf16 is not None
    assert torch.equal(head(hidden), exact_argmax(hidden, weight))
