"""Prometheus metrics of one teacher server (own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = tuple(2**i for i in range(6, 19))


class TeacherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tokens = Counter("livefuse_teacher_tokens_scored", "Tokens scored (rate() gives tokens/s)", registry=r)
        self.texts = Counter("livefuse_teacher_texts_scored", "Texts scored", registry=r)
        self.requests = Counter("livefuse_teacher_requests", "Finished RPCs by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("livefuse_teacher_request_latency_seconds", "RPC latency by method", ["method"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_tokens = Histogram("livefuse_teacher_batch_tokens", "Padded tokens per forward pass",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("livefuse_teacher_batch_seconds", "Seconds per forward pass + top-k",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_texts = Gauge("livefuse_teacher_queue_texts", "Texts waiting for a forward pass", registry=r)
        self.queue_tokens = Gauge("livefuse_teacher_queue_tokens", "Tokens waiting for a forward pass", registry=r)
        self.rejected = Counter("livefuse_teacher_queue_rejections", "Requests refused because the queue was full",
                                registry=r)
        self.overloaded = Counter("livefuse_teacher_overload_refusals",
                                  "Requests refused at once because the work queued ahead would outlast their deadline",
                                  registry=r)
        self.address: tuple[str, int] | None = None

    def serve_http(self, port: int, host: str) -> int:
        """Starts the /metrics endpoint (plain HTTP, no auth) in a daemon thread; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.address = (host, int(self._http.server_port))
        return self.address[1]

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
