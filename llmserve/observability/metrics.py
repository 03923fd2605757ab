"""Prometheus metrics of a serving engine, with vLLM's names under the `llmserve:` prefix.

Latencies and token counts come from the AsyncEngine's observer hooks; gauges and engine
counters (running, waiting, KV usage, preemptions, prefix cache) are read from the engine's
latest `stats()` when Prometheus scrapes, so they cost nothing between scrapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from llmserve.engine.async_engine import AsyncEngine
    from llmserve.outputs import RequestOutput

PREFIX = "llmserve:"
# Buckets as vLLM uses them, so dashboards built for it read ours unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class EngineMetrics:
    """Registers itself as an AsyncEngine observer and exposes a Prometheus registry.

    Args:
        engine: the AsyncEngine to observe.
        model_name: value of the `model_name` label on every series.
        registry: where to register (default: a new registry, so several servers in one
            process do not collide).
    """

    def __init__(self, engine: AsyncEngine, model_name: str,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.",
                             REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Time from arrival to first scheduling.", REQUEST_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens_total", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens_total", "Generated tokens.")
        self._success = Counter(PREFIX + "request_success_total", "Finished requests.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.registry.register(_EngineStatsCollector(engine, model_name))
        engine.add_observer(self)

    # -- AsyncEngine hooks ----------------------------------------------------------------------
    def on_first_token(self, request_id: str, ttft: float) -> None:
        self.ttft.observe(ttft)

    def on_token(self, request_id: str, num_new_tokens: int, interval: float) -> None:
        self.itl.observe(interval)

    def on_finished(self, output: RequestOutput, usage: dict, timings: dict) -> None:
        self.e2e.observe(timings["e2e"])
        if timings.get("queue_time") is not None:
            self.queue_time.observe(timings["queue_time"])
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.generation_tokens.inc(usage["completion_tokens"])
        reason = output.outputs[0].finish_reason if output.outputs else "abort"
        self._success.labels(self.model_name, reason or "abort").inc()


class _EngineStatsCollector:
    """Reads the engine's latest stats snapshot at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def describe(self) -> list:
        return []  # values are only known at scrape time

    def collect(self):
        stats = self.engine.stats()
        gauges = [
            ("num_requests_running", "Requests running on the engine.",
             stats.get("num_running", 0)),
            ("num_requests_waiting", "Requests waiting to be scheduled.",
             stats.get("num_waiting", 0) + stats.get("num_pending", 0)),
            ("kv_cache_usage_perc", "KV-cache usage as a fraction (1 = full).",
             stats.get("kv_cache_usage", 0.0)),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family
        counters = [
            ("num_preemptions", "Preemptions by the scheduler.", "num_preemptions"),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             "prefix_cache_queries"),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             "prefix_cache_hits"),
        ]
        for name, doc, key in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats.get(key, 0)))
            yield family
