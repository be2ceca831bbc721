"""Prometheus metrics of one service, and the ASGI middleware that counts and times every
response and tells its time in a Server-Timing header (plain ASGI: no web framework needed
to read or test it)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """Prometheus metrics in a registry of the app's own (so one process can hold several)."""

    content_type = CONTENT_TYPE_LATEST  # of `exposition()`

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vistra_http_requests", "HTTP requests by path, method and "
                                "status code", ["path", "method", "code"], registry=r)
        self.latency = Histogram(
            "vistra_http_request_duration_seconds", "Time from request to response", ["path"],
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.batch_size = Histogram("vistra_batch_size", "Images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.inference = Histogram(
            "vistra_batch_inference_seconds", "Time of one forward pass",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.queue_depth = Gauge("vistra_queue_depth", "Images waiting for the model thread",
                                 registry=r)
        self.in_flight = Gauge("vistra_predictions_in_flight", "Prediction requests being "
                               "received, decoded, queued or run", registry=r)
        self.read_timeouts = Counter(
            "vistra_upload_read_timeouts", "Request bodies that stopped arriving for "
            "read_timeout_s (answered 408)", registry=r)
        self.client_limit_refusals = Counter(
            "vistra_client_limit_refusals", "Predictions refused because their client address "
            "had max_in_flight_per_client in progress (answered 429)", registry=r)
        self.explains_in_flight = Gauge("vistra_explains_in_flight", "Heat-map requests in "
                                        "the service", registry=r)
        self.explain_refusals = Counter(
            "vistra_explain_refusals", "Heat-map requests refused because "
            "explain_max_in_flight were in progress (answered 503)", registry=r)
        self.explain_timeouts = Counter(
            "vistra_explain_timeouts", "Heat-map requests not answered within "
            "explain_timeout_s (answered 504)", registry=r)
        self.explain_seconds = Histogram(
            "vistra_explain_seconds", "Time to draw one heat map and its overlay",
            buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.model = Info("vistra_model", "The model served: name, backend and the dtype it "
                          "computes in", registry=r)

    def batch(self, size: int, seconds: float) -> None:
        """One forward pass of `size` images (the batcher's `on_batch`)."""
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def exposition(self) -> bytes:
        """Every metric in Prometheus text format, for GET /metrics."""
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: every response counted by path (known routes only, so scanners
    cannot grow the label set), method and status code, and timed; the time from the request
    to its response's head is sent as `Server-Timing: total;dur=MS`, so a client can tell
    the server's time from the network's."""

    def __init__(self, app: Callable, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                total = f"total;dur={(time.perf_counter() - start) * 1000:.3f}".encode()
                message["headers"] = [*message.get("headers", ()), (b"server-timing", total)]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)
