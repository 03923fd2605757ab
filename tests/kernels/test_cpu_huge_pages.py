"""Huge pages for long-lived CPU tensors (`llmserve.kernels.cpu_huge_pages`): which ranges are
advised, that the kernel then backs them with 2 MiB pages, and that nothing is lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llmserve.kernels import cpu_huge_pages
from llmserve.kernels.cpu_huge_pages import HUGE_PAGE

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
thp_mode = THP.read_text().split("[")[1].split("]")[0] if THP.exists() else "never"
needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or thp_mode == "never",
                               reason="transparent huge pages are off here")


def huge_bytes(ptr: int) -> int:
    """AnonHugePages of the mapping holding address `ptr` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def test_only_distinct_storages_of_two_mib_or_more_are_advised():
    big = torch.empty(3 * HUGE_PAGE // 4)  # 6 MiB: at least one aligned 2 MiB page inside
    small = torch.empty(HUGE_PAGE // 8)  # 1 MiB
    ranges = cpu_huge_pages._ranges([big, big[10:], big.view(2, -1), small, "not a tensor"])
    assert len(ranges) == 1
    start, end = ranges[0]
    assert start % HUGE_PAGE == 0 and end % HUGE_PAGE == 0 and end > start
    assert big.data_ptr() <= start and end <= big.data_ptr() + big.numel() * 4


@needs_thp
def test_a_tensor_advised_before_it_is_filled_faults_in_huge():
    t = cpu_huge_pages.advise_before_fill(torch.empty(16 * HUGE_PAGE // 4))
    t.fill_(1.5)
    assert huge_bytes(t.data_ptr() + 8 * HUGE_PAGE) >= HUGE_PAGE
    assert bool((t == 1.5).all())


@needs_thp
def test_a_filled_tensor_keeps_its_values_when_advised():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(12 * HUGE_PAGE // 4, generator=g)
    want = t.clone()
    assert cpu_huge_pages.advise([t]) >= 8 * HUGE_PAGE
    assert torch.equal(t, want)


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(cpu_huge_pages.ENV_SWITCH, "0")
    assert not cpu_huge_pages.enabled()
    assert cpu_huge_pages.advise([torch.empty(4 * HUGE_PAGE // 4)]) == 0
