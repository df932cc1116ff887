"""Prometheus metrics of one server, on a private registry (two servers in one process never collide).

Latency histograms are observed by the engine thread as tokens reach each request; everything the engine
counts (running/waiting requests, cache blocks per tier, prefix hits, preemptions) is read from the engine
thread's latest `stats()` snapshot when /metrics is scraped.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TIERS = ("gpu", "cpu", "disk")


class _EngineCollector:
    """Turns the engine loop's snapshot (a dict) into gauges and counters at scrape time."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        for name, key, doc in (("num_requests_running", "requests_running", "Requests in the running batch."),
                               ("num_requests_waiting", "requests_waiting",
                                "Requests admitted but not yet running (server queue + engine queue).")):
            g = GaugeMetricFamily(f"nanokimi_{name}", doc)
            g.add_metric([], s.get(key, 0))
            yield g
        usage = GaugeMetricFamily("nanokimi_cache_usage_ratio", "Fraction of a KV tier's blocks in use.",
                                  labels=["tier"])
        total = GaugeMetricFamily("nanokimi_cache_blocks_total", "KV blocks a tier can hold.", labels=["tier"])
        free = GaugeMetricFamily("nanokimi_cache_blocks_free", "KV blocks of a tier no request holds.",
                                 labels=["tier"])
        cached = GaugeMetricFamily("nanokimi_cache_blocks_cached", "KV blocks of a tier holding a reusable prefix.",
                                   labels=["tier"])
        hits = CounterMetricFamily("nanokimi_prefix_cache_hits", "Prompt tokens served from a KV tier.",
                                   labels=["tier"])
        for tier in TIERS:
            t = s.get("tiers", {}).get(tier)
            if t is None:
                continue
            usage.add_metric([tier], t["usage"])
            total.add_metric([tier], t["blocks_total"])
            free.add_metric([tier], t["blocks_free"])
            cached.add_metric([tier], t["blocks_cached"])
            hits.add_metric([tier], t["hit_tokens"])
        yield from (usage, total, free, cached, hits)
        for name, key, doc in (("prefix_cache_queries", "prefix_cache_queries",
                                "Prompt tokens looked up in the cache."),
                               ("preemptions", "preemptions", "Running requests preempted for lack of blocks."),
                               ("prompt_tokens", "prompt_tokens_computed", "Prompt tokens prefilled (cache misses)."),
                               ("generation_tokens", "decode_tokens", "Tokens generated.")):
            c = CounterMetricFamily(f"nanokimi_{name}", doc)
            c.add_metric([], s.get(key, 0))
            yield c


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshot))
        self.ttft = Histogram("nanokimi_time_to_first_token_seconds", "Arrival to the first generated token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("nanokimi_inter_token_latency_seconds", "Time between successive generated tokens.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("nanokimi_e2e_request_latency_seconds", "Arrival to the last token.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rejected = Counter("nanokimi_requests_rejected", "Requests refused with 429 before any prefill.",
                                ["reason"], registry=self.registry)
        self.finished = Counter("nanokimi_requests_finished", "Requests that ended, by how.", ["reason"],
                                registry=self.registry)
        for reason in ("ttft", "tbt", "queue"):
            self.rejected.labels(reason)
        for reason in ("stop", "length", "abort"):
            self.finished.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
