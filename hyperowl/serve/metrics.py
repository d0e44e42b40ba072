"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from hyperowl.serve.media_cache import MediaCache

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """Requests and errors by status, queue depth, batch sizes, first-token latency and tokens/s.

    `hyperowl_tokens_per_second` is the generation rate over the last `window_s` seconds;
    `rate(hyperowl_generated_tokens_total[1m])` gives the same from the counter.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hyperowl_requests", "HTTP requests answered, by path and status", ["path", "status"], registry=self.registry
        )
        self.errors = Counter("hyperowl_errors", "HTTP answers with status >= 400, by status", ["status"], registry=self.registry)
        self.queue_depth = Gauge("hyperowl_queue_depth", "Requests waiting for a batch slot", registry=self.registry)
        self.batch_size = Gauge("hyperowl_batch_size", "Requests being decoded", registry=self.registry)
        self.first_token = Histogram(
            "hyperowl_first_token_seconds",
            "Time from submission to the first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "hyperowl_request_seconds", "Time from submission to the last token", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.decode_batch = Histogram(
            "hyperowl_decode_batch_size",
            "Rows in each decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.tokens = Counter("hyperowl_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("hyperowl_prompt_tokens", "Prompt tokens of admitted requests", registry=self.registry)
        self.tokens_per_second = Gauge(
            "hyperowl_tokens_per_second", "Tokens generated per second, recent window", registry=self.registry
        )
        self.tokens_per_second.set_function(self._recent_rate)
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def watch_media_cache(self, cache: MediaCache) -> None:
        """Export the media cache's hits, misses, entries and bytes (read when scraped)."""
        for name, text, read in (
            ("hits", "Media found in the feature cache (not decoded, no vision tower)", lambda: cache.hits),
            ("misses", "Media not in the feature cache (decoded and encoded, then kept)", lambda: cache.misses),
            ("entries", "Media in the feature cache", lambda: len(cache)),
            ("bytes", "Bytes of features in the media cache", lambda: cache.nbytes),
        ):
            Gauge(f"hyperowl_media_cache_{name}", text, registry=self.registry).set_function(read)

    def count_tokens(self, n: int) -> None:
        """Record `n` tokens generated now."""
        self.tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            self._prune(now)

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()

    def _recent_rate(self) -> float:
        with self._lock:
            self._prune(time.monotonic())
            return sum(n for _, n in self._recent) / self._window_s

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
