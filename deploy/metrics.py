"""Prometheus metrics of the HTTP front end: requests by endpoint/status, token counters,
time-to-first-token and end-to-end latency histograms, and each dense replica's engine state
(refreshed from the replicas' `stats()` at scrape time): gauges for what goes up and down,
counters for the lifetime totals (they restart from 0 with a replica, which `rate()` handles)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ENGINE_GAUGES = {
    "running": "sequences in the running batch",
    "waiting": "requests waiting for a cache slot",
    "free_slots": "free cache slots",
    "max_num_seqs": "cache slots in total",
    "kv_blocks_total": "KV cache blocks in the pool",
    "kv_blocks_free": "KV cache blocks free or evictable",
    "prefix_cache_snapshots": "DeltaNet state snapshots held by the prefix cache",
}
ENGINE_COUNTERS = {
    "steps": "engine steps run",
    "prompt_tokens": "prompt tokens prefilled",
    "generated_tokens": "tokens generated",
    "finished": "requests finished (any reason)",
    "errors": "requests failed by an engine error",
    "step_seconds": "seconds spent in engine steps",
    "kv_block_evictions": "cached KV blocks evicted to make room",
    "preemptions": "requests preempted when KV blocks ran out (resumed later)",
    "prefix_cache_queried_tokens": "prompt tokens looked up in the prefix cache",
    "prefix_cache_hit_tokens": "prompt tokens served from the prefix cache",
}
STALE_AFTER_S = 60.0  # forget a replica not seen for this long (scaled down or restarted)


class EngineCollector(Collector):
    """Per-replica engine metrics from the last `stats()` of each replica."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, float] = {}

    def update(self, stats: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for s in stats:
            replica = str(s.get("replica", ""))
            self.stats[replica], self.seen[replica] = s, now
        for replica, seen in list(self.seen.items()):
            if now - seen > STALE_AFTER_S:
                del self.seen[replica], self.stats[replica]

    def collect(self) -> Iterator[Metric]:
        families: list[tuple[type, dict[str, str]]] = [
            (GaugeMetricFamily, ENGINE_GAUGES),
            (CounterMetricFamily, ENGINE_COUNTERS),
        ]
        for family_cls, docs in families:
            for name, doc in docs.items():
                family = family_cls(f"expertmesh_engine_{name}", doc, labels=["replica"])
                for replica, s in sorted(self.stats.items()):
                    if name in s:
                        family.add_metric([replica], float(s[name]))
                yield family


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "expertmesh_requests", "HTTP API requests", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "expertmesh_prompt_tokens", "prompt tokens of requests", registry=r
        )
        self.generation_tokens = Counter(
            "expertmesh_generation_tokens", "tokens generated", registry=r
        )
        self.ttft = Histogram(
            "expertmesh_time_to_first_token_seconds",
            "request arrival to first token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "expertmesh_e2e_request_latency_seconds",
            "request arrival to last token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine = EngineCollector()
        r.register(self.engine)

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def first_token(self, endpoint: str, start: float) -> None:
        self.ttft.labels(endpoint).observe(time.perf_counter() - start)

    def finished(self, endpoint: str, start: float, prompt: int, completion: int) -> None:
        self.e2e.labels(endpoint).observe(time.perf_counter() - start)
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)

    def update_engine(self, stats: list[dict[str, Any]]) -> None:
        self.engine.update(stats)

    @property
    def known_replicas(self) -> int:
        return len(self.engine.seen)

    def render(self) -> bytes:
        return generate_latest(self.registry)
