"""Hardware-cost attribution: conservation across concurrent requests, and the weighting rule."""

from __future__ import annotations

import random

import pytest

from llmserve.observability.cost import Attribution, HardwareMeter, hardware_cost, request_cost
from llmserve.observability.pricing import HardwarePrice, ListPrice


def _simulate(seed: int, num_requests: int, meter: HardwareMeter):
    """A synthetic continuous-batching timeline: Poisson-ish arrivals, chunked prefill, decode,
    random gaps between steps and between busy windows. Returns (attributions, busy seconds)."""
    rng = random.Random(seed)
    t = 1_000.0
    pending = []
    for i in range(num_requests):
        t += rng.choice([0.0, 0.01, 0.05, 0.3, 2.0])  # some arrive together, some after idle
        pending.append({"id": f"r{i}", "arrival": t, "prompt": rng.randint(1, 300),
                        "out": rng.randint(1, 40), "done_p": 0, "done_d": 0})
    clock = pending[0]["arrival"]
    waiting, running, result = list(pending), [], {}
    busy = 0.0
    window_start = None
    while waiting or running:
        if not running and waiting and waiting[0]["arrival"] > clock:
            clock = waiting[0]["arrival"]  # machine idle with nothing in flight
        while waiting and waiting[0]["arrival"] <= clock:
            r = waiting.pop(0)
            if window_start is None:
                window_start = r["arrival"]
            meter.add(r["id"], r["arrival"])
            running.append(r)
        clock += rng.uniform(0.0, 0.004)  # scheduling gap
        budget, work = 64, {}
        for r in running:
            if budget <= 0:
                break
            if r["done_p"] < r["prompt"]:
                n = min(budget, r["prompt"] - r["done_p"])
                r["done_p"] += n
                budget -= n
                work[r["id"]] = (n, 0)
            else:
                r["done_d"] += 1
                budget -= 1
                work[r["id"]] = (0, 1)
        start = clock
        clock += 0.002 + 0.0001 * (64 - budget)  # step time grows with the batch
        meter.step(start, clock, work)
        clock += rng.uniform(0.0, 0.002)  # detokenise and deliver
        for r in list(running):
            if r["done_d"] >= r["out"]:
                running.remove(r)
                result[r["id"]] = meter.finish(r["id"], clock)
        if not running and not any(w["arrival"] <= clock for w in waiting):
            busy += clock - window_start
            window_start = None
    return result, busy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hardware_cost_is_conserved_across_concurrent_requests_of_different_lengths(seed):
    meter = HardwareMeter(prefill_token_weight=1.0, decode_token_weight=3.0)
    attributions, busy = _simulate(seed, 40, meter)
    price = HardwarePrice(usd_per_hour=7.2, prefill_token_weight=1.0, decode_token_weight=3.0)
    costs = [hardware_cost(a, price).total_usd for a in attributions.values()]
    expected = busy * price.usd_per_second
    assert len(attributions) == 40
    assert sum(costs) == pytest.approx(expected, rel=1e-3)
    assert meter.busy_seconds == pytest.approx(busy, rel=1e-9)
    assert min(costs) > 0  # every request pays something
    assert len({round(c, 12) for c in costs}) > 30  # different lengths, different costs


def test_step_time_is_split_by_weighted_tokens():
    meter = HardwareMeter(prefill_token_weight=1.0, decode_token_weight=2.0)
    meter.add("a", 0.0)
    meter.add("b", 0.0)
    # a prefills 6 tokens (weight 6), b decodes 2 (weight 4): 0.6 s and 0.4 s of a 1 s step.
    meter.step(0.0, 1.0, {"a": (6, 0), "b": (0, 2)})
    a = meter.finish("a", 1.0)
    b = meter.finish("b", 1.0)
    assert a.prefill_seconds == pytest.approx(0.6) and a.decode_seconds == 0
    assert b.decode_seconds == pytest.approx(0.4) and b.prefill_seconds == 0
    assert a.idle_seconds == b.idle_seconds == 0


def test_idle_gap_is_shared_only_by_requests_in_flight():
    meter = HardwareMeter()
    meter.add("a", 0.0)
    meter.step(0.0, 1.0, {"a": (4, 0)})
    meter.add("b", 2.0)  # [1, 2] is a's alone; [2, 3] is shared
    meter.step(3.0, 4.0, {"a": (0, 1), "b": (1, 0)})
    a = meter.finish("a", 4.0)
    b = meter.finish("b", 5.0)  # [4, 5] is b's alone
    assert a.idle_seconds == pytest.approx(1.0 + 0.5)
    assert b.idle_seconds == pytest.approx(0.5 + 1.0)
    assert a.seconds + b.seconds == pytest.approx(5.0)
    assert meter.busy_seconds == pytest.approx(5.0)


def test_time_with_nothing_in_flight_is_charged_to_nobody():
    meter = HardwareMeter()
    meter.add("a", 0.0)
    meter.step(0.0, 1.0, {"a": (1, 0)})
    assert meter.finish("a", 1.0).seconds == pytest.approx(1.0)
    meter.add("b", 10.0)
    meter.step(10.0, 10.5, {"b": (1, 0)})
    assert meter.finish("b", 10.5).seconds == pytest.approx(0.5)
    assert meter.busy_seconds == pytest.approx(1.5)


def test_aborted_request_keeps_the_cost_of_what_it_computed():
    meter = HardwareMeter()
    meter.add("a", 0.0)
    meter.add("b", 0.0)
    meter.step(0.0, 1.0, {"a": (5, 0), "b": (5, 0)})
    aborted = meter.finish("b", 1.0)  # aborted after its prefill
    assert aborted.seconds == pytest.approx(0.5)
    cost = request_cost(HardwarePrice(usd_per_hour=3600.0), prompt_tokens=5, cached_tokens=0,
                        completion_tokens=0, completed=False, attribution=aborted)
    assert cost.total_usd == pytest.approx(0.5)
    assert meter.finish("never-added", 2.0).seconds == 0


def test_hardware_cost_splits_idle_time_like_the_requests_own_work():
    att = Attribution(prefill_seconds=1.0, decode_seconds=3.0, idle_seconds=2.0)
    cost = hardware_cost(att, HardwarePrice(usd_per_hour=3600.0))
    assert cost.input_usd == pytest.approx(1.5)
    assert cost.output_usd == pytest.approx(4.5)
    assert cost.total_usd == pytest.approx(6.0)


def test_list_price_bills_cached_input_at_the_cached_rate():
    price = ListPrice(input_per_1m=2.0, output_per_1m=8.0, cached_input_per_1m=0.5)
    cost = request_cost(price, prompt_tokens=1000, cached_tokens=400, completion_tokens=100,
                        completed=True)
    assert cost.cached_input_usd == pytest.approx(400 * 0.5 / 1e6)
    assert cost.input_usd == pytest.approx((600 * 2.0 + 400 * 0.5) / 1e6)
    assert cost.output_usd == pytest.approx(100 * 8.0 / 1e6)


def test_list_price_of_an_aborted_request_counts_only_computed_prefill():
    price = ListPrice(input_per_1m=1e6, output_per_1m=1e6)  # $1 per token for easy numbers
    cost = request_cost(price, prompt_tokens=100, cached_tokens=16, completion_tokens=0,
                        completed=False, computed_prefill_tokens=32)
    assert cost.total_usd == pytest.approx(48.0)
    assert request_cost(None, prompt_tokens=1, cached_tokens=0, completion_tokens=1,
                        completed=True) is None


def test_step_that_ends_before_it_starts_is_rejected():
    with pytest.raises(ValueError, match="before it starts"):
        HardwareMeter().step(2.0, 1.0, {})
