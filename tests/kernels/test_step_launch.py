"""StepLaunch: the first launch goes through Triton's JIT, later ones relaunch the compiled
kernel with the argument list Triton itself would pass (checked with a stand-in kernel, since
the interpreter has no compiled kernels)."""

from __future__ import annotations

import pytest
import torch

from llmserve.kernels import common
from llmserve.kernels.common import StepLaunch, launch_key


class _Compiled:
    """Stands in for triton.compiler.CompiledKernel: `kernel[grid](*args)` launches."""

    function = object()

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def run(self, *args: object) -> None:  # pragma: no cover - present for the type check
        raise AssertionError("StepLaunch must launch through kernel[grid]")

    def __getitem__(self, grid: tuple):
        return lambda *args: self.calls.append(("compiled", grid, args))


class _Jit:
    """Stands in for a JITFunction: `fn[grid](*args, **constexprs, **options)`."""

    arg_names = ["x_ptr", "n", "stride", "BLOCK", "EVEN"]

    def __init__(self) -> None:
        self.calls: list = []
        self.compiled = _Compiled(self.calls)

    def __getitem__(self, grid: tuple):
        def launch(*args: object, **kwargs: object) -> _Compiled:
            self.calls.append(("jit", grid, args, kwargs))
            return self.compiled

        return launch


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(common, "fast_launch_enabled", lambda: True)


def test_relaunches_with_constexprs_in_signature_order(fast):
    fn = _Jit()
    launch = StepLaunch(fn, (4, 2, 1), {"EVEN": True, "BLOCK": 64}, num_warps=4)
    launch("k", "x", 10, 3)
    launch("k", "y", 11, 3)
    jit_kwargs = {"EVEN": True, "BLOCK": 64, "num_warps": 4}
    assert fn.calls[0] == ("jit", (4, 2, 1), ("x", 10, 3), jit_kwargs)
    # Triton's JIT passes every bound parameter, constexprs included, to the launcher.
    assert fn.calls[1] == ("compiled", (4, 2, 1), ("y", 11, 3, 64, True))


def test_a_new_key_goes_back_through_the_jit(fast):
    fn = _Jit()
    launch = StepLaunch(fn, (1, 1, 1), {"BLOCK": 16, "EVEN": False})
    for key in ("a", "a", "b", "b", "a"):
        launch(key, "x", 1, 1)
    assert [c[0] for c in fn.calls] == ["jit", "compiled", "jit", "compiled", "jit"]


def test_no_key_or_no_fast_launch_always_takes_the_jit(monkeypatch):
    fn = _Jit()
    launch = StepLaunch(fn, (1, 1, 1), {"BLOCK": 16, "EVEN": False})
    monkeypatch.setattr(common, "fast_launch_enabled", lambda: True)
    launch(None, "x", 1, 1)
    launch(None, "x", 1, 1)
    monkeypatch.setattr(common, "fast_launch_enabled", lambda: False)
    launch("k", "x", 1, 1)
    launch("k", "x", 1, 1)
    assert [c[0] for c in fn.calls] == ["jit"] * 4


def test_fast_launch_is_off_under_the_interpreter_and_by_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not common.fast_launch_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("LLMSERVE_TRITON_FAST_LAUNCH", "0")
    assert not common.fast_launch_enabled()


def test_launch_key_tells_layouts_apart_and_refuses_misaligned_pointers():
    a = torch.zeros(8, 4, 16)
    assert launch_key(a, a) == launch_key(torch.ones(8, 4, 16), torch.ones(8, 4, 16))
    assert launch_key(a) != launch_key(a.to(torch.float16))
    assert launch_key(a) != launch_key(a.transpose(0, 1))
    assert launch_key(a.view(-1)[1:]) is None  # 4 bytes past an aligned start
