"""Prometheus metrics and the structured access log.

Metrics (``GET /metrics``, Prometheus' text format, one registry per app):

- ``edge_tl_requests_total{route, method, status}``: requests answered, by the route's
  template (``/v2/models/{name}/infer``, never the raw path) and method (one of
  :data:`METHODS` or ``other``), so the label set stays small under a scan;
- ``edge_tl_request_seconds{route}``: latency histogram, from the request's arrival to its
  response's start;
- ``edge_tl_learning_operations_total{model, op, outcome}``: learning calls (learn,
  remove, relabel, good, calibrate, rollback), ``ok`` or ``refused``;
- ``edge_tl_images_total{model}``: images answered by ``infer``.

The access log is one JSON object per request on the ``edge_tl.serve.access`` logger:
time, client address, method, path (without the query, cut at :data:`MAX_LOGGED_PATH`
characters), route, status and milliseconds.
Headers are never logged, so neither is the bearer token. Torch-free.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

__all__ = ["Metrics"]

_access = logging.getLogger("edge_tl.serve.access")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
"""Methods counted under their own name; any other (``FOOBAR``, a scanner's random word)
is counted as ``other``, so that requests cannot add label sets without bound."""
MAX_LOGGED_PATH = 200
"""Characters of a request's path written to the access log, at most."""
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The app's counters and histogram, and the ASGI middleware that fills them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edge_tl_requests_total",
            "Requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edge_tl_request_seconds",
            "Seconds from a request's arrival to its response's start, by route template.",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.learning = Counter(
            "edge_tl_learning_operations_total",
            "Learning operations, by model, operation and outcome (ok or refused).",
            ["model", "op", "outcome"],
            registry=self.registry,
        )
        self.images = Counter(
            "edge_tl_images_total",
            "Images answered by infer, by model.",
            ["model"],
            registry=self.registry,
        )

    def exposition(self) -> tuple[bytes, str]:
        """``(body, content type)`` of ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware(self, app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """``app`` wrapped: every HTTP request counted, timed and written to the access log."""

        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            t0 = time.perf_counter()
            status = {"code": 500, "at": None}

            async def watching(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    status["at"] = time.perf_counter()
                await send(message)

            try:
                await app(scope, receive, watching)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None) or "(unmatched)"
                seconds = (status["at"] or time.perf_counter()) - t0
                method = scope.get("method", "")
                counted = method if method in METHODS else "other"
                self.requests.labels(template, counted, str(status["code"])).inc()
                self.latency.labels(template).observe(seconds)
                client = scope.get("client") or ("", 0)
                _access.info(
                    json.dumps(
                        {
                            "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "client": f"{client[0]}:{client[1]}",
                            "method": method[:16],
                            "path": scope.get("path", "")[:MAX_LOGGED_PATH],
                            "route": template,
                            "status": status["code"],
                            "ms": round(seconds * 1e3, 2),
                        }
                    )
                )

        return wrapped
