"""Prometheus metrics of one server (a registry per app, not prometheus-client's global one).

gptkit_requests_total{route,status}        HTTP requests answered, by route and status
gptkit_prompt_tokens_total                 prompt tokens of accepted requests
gptkit_generation_tokens_total             tokens generated
gptkit_time_to_first_token_seconds         request arrival to its first generated token
gptkit_inter_token_latency_seconds         between consecutive tokens of one choice
gptkit_request_duration_seconds            request arrival to its last token
gptkit_requests_running                    engine requests holding a slot   (engine.stats())
gptkit_requests_waiting                    engine requests queued for a slot
gptkit_busy_slots / gptkit_slots           slots in use / all slots
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineGauges(Collector):
    """Gauges read from ``engine.stats()`` at scrape time (zeros while the model loads)."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        values = {
            "requests_running": ("engine requests holding a slot", "running"),
            "requests_waiting": ("engine requests waiting for a slot", "waiting"),
            "busy_slots": ("batch slots in use", "busy_slots"),
            "slots": ("batch slots (--max-batch)", "max_batch"),
        }
        for name, (doc, attr) in values.items():
            value = float(getattr(stats, attr, 0)) if stats is not None else 0.0
            yield GaugeMetricFamily(f"gptkit_{name}", doc, value=value)


class Metrics:
    """The counters and histograms the server updates, and the scrape output."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gptkit_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "gptkit_prompt_tokens", "prompt tokens of accepted requests", registry=r
        )
        self.generation_tokens = Counter("gptkit_generation_tokens", "generated tokens", registry=r)
        self.time_to_first_token = Histogram(
            "gptkit_time_to_first_token_seconds",
            "time from a request's arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "gptkit_inter_token_latency_seconds",
            "time between consecutive tokens of one choice",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "gptkit_request_duration_seconds",
            "time from a request's arrival to its last token",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        r.register(_EngineGauges(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
