"""Builds and runs a teacher server: gRPC Teacher + health + reflection services, metrics endpoint.

    server = TeacherServer(config); await server.start()   # binds; health NOT_SERVING
    await server.load()                                     # model ready and warmed up; health SERVING
    await server.stop()                                     # drains in-flight requests (SIGTERM does this)
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.service import TEACHER_SERVICE
from protos.vocabulary import detect_conventions
from teacher_server.backends import load_backend
from teacher_server.backends.base import Backend, BackendDead, EngineBackend, Gather, ScoreOutput
from teacher_server.batcher import TokenBudgetBatcher
from teacher_server.config import TeacherConfig
from teacher_server.engine_queue import EngineQueue
from teacher_server.gate import RequestGate
from teacher_server.health_service import DrainingHealthServicer
from teacher_server.metrics import TeacherMetrics
from teacher_server.security import load_token, server_credentials
from teacher_server.servicer import TeacherServicer
from teacher_server.tokenizer import TeacherTokenizer

log = logging.getLogger("livefuse.teacher.server")


def _server_version() -> str:
    try:
        return version("livefuse")
    except PackageNotFoundError:
        return "unknown"


def build_info(config: TeacherConfig, backend: Backend | EngineBackend, tokenizer: TeacherTokenizer
               ) -> pb.TeacherInfo:
    """The limits a client sees, tightened by what the model itself can take."""
    max_tokens = config.max_tokens_per_text
    if backend.max_positions is not None:
        max_tokens = min(max_tokens, backend.max_positions - int(config.add_bos))
    if config.max_top_k > backend.vocab_size:
        raise ValueError(f"max_top_k={config.max_top_k} exceeds the model's vocabulary size {backend.vocab_size}")
    conv = detect_conventions(tokenizer.vocab(backend.vocab_size))  # how GetVocab's strings spell text
    encoding = (pb.VOCAB_ENCODING_BYTE_LEVEL if conv.byte_level else
                pb.VOCAB_ENCODING_SENTENCEPIECE if conv.spm_marker else pb.VOCAB_ENCODING_PLAIN)
    return pb.TeacherInfo(
        model_name=config.model, architecture=backend.architecture, tokenizer_fingerprint=tokenizer.fingerprint,
        vocab_size=backend.vocab_size, tokenizer_size=tokenizer.size, special_token_ids=tokenizer.special_ids,
        max_top_k=config.max_top_k, max_texts_per_request=config.max_texts_per_request,
        max_tokens_per_text=max_tokens, max_tokens_per_request=config.max_tokens_per_request,
        max_message_bytes=config.max_message_bytes, dtype=backend.dtype, device=backend.device,
        backend=backend.name, add_bos=config.add_bos, server_version=_server_version(),
        default_top_k=config.default_top_k, vocab_encoding=encoding, vocab_byte_fallback=conv.byte_fallback,
        max_gather_ids=(config.max_gather_ids or 0) if getattr(backend, "can_gather", False) else 0,
    )


def warmup_batches(config: TeacherConfig, info: pb.TeacherInfo) -> list[list[np.ndarray]]:
    """A short text; under --compile also two full-budget batches of different lengths, so the compiled
    graph (dynamic in length after the second shape) exists before the server reports SERVING."""
    batches = [[np.arange(1, 17) % info.vocab_size]]
    if config.compile:
        for length in (min(info.max_tokens_per_text, 512), min(info.max_tokens_per_text, 512) // 2):
            count = max(1, min(config.max_batch_texts, config.max_batch_tokens // max(length, 1)))
            batches.append([np.arange(length) % info.vocab_size] * count)
    return batches


class TeacherServer:
    def __init__(self, config: TeacherConfig, backend: Backend | EngineBackend | None = None,
                 tokenizer: TeacherTokenizer | None = None) -> None:
        """``backend``/``tokenizer`` may be given (tests, embedding); otherwise ``load`` builds them."""
        self.config = config
        self._given = (backend, tokenizer)
        self.metrics = TeacherMetrics()
        self.health = DrainingHealthServicer()
        self.servicer = TeacherServicer(config, self.metrics)
        self.batcher: TokenBudgetBatcher | EngineQueue | None = None
        self.dead = asyncio.Event()  # the backend can never score again (BackendDead): stop, exit non-zero
        self.port = 0
        self.metrics_port: int | None = None
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes)]
        if config.max_connection_age_s is not None:  # clients reconnect, re-resolving DNS: scale-ups are seen
            options += [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000))]
        token = load_token(config)
        self._credentials = server_credentials(config)
        self.server = grpc.aio.server(options=options, interceptors=[RequestGate(token, self.metrics)])

    async def start(self) -> int:
        """Binds and starts serving health (NOT_SERVING) and reflection; returns the gRPC port."""
        pb_grpc.add_TeacherServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (TEACHER_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        for name in ("", TEACHER_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        self.port = (self.server.add_secure_port(address, self._credentials) if self._credentials
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}")
        await self.server.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port, self.config.metrics_address)
            self._warn_if_metrics_exposed()
        log.info("listening", extra={"fields": {"port": self.port, "metrics_port": self.metrics_port}})
        return self.port

    def _warn_if_metrics_exposed(self) -> None:
        """/metrics has no TLS and no auth: say so when it is reachable from the network beside a gRPC port
        that requires TLS or a token."""
        host = self.config.metrics_address
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback and (self.config.tls_cert or self.config.auth_token_file):
            log.warning(f"/metrics on {host}:{self.metrics_port} is plain HTTP without auth while gRPC requires "
                        "TLS or a token; anyone who reaches it sees the load and error counts. Bind it with "
                        "--metrics-host 127.0.0.1 (or a private interface) or disable it with --metrics-port none")

    async def load(self) -> None:
        """Loads (unless given) and warms up the model, then reports SERVING."""
        backend, tokenizer = self._given
        if backend is None or tokenizer is None:
            loop = asyncio.get_running_loop()
            backend, tokenizer = await loop.run_in_executor(None, load_backend, self.config)
        info = build_info(self.config, backend, tokenizer)
        self.batcher = self._scheduler(backend)
        self.batcher.start()
        if self.config.warmup:
            t0 = time.perf_counter()
            for batch in warmup_batches(self.config, info):
                await self.batcher.submit(batch, info.max_top_k)
            log.info("warmed up", extra={"fields": {"seconds": round(time.perf_counter() - t0, 3)}})
        self.servicer.attach(info, tokenizer, self.batcher)
        for name in ("", TEACHER_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"fields": {"model": info.model_name, "vocab_size": info.vocab_size,
                                              "fingerprint": info.tokenizer_fingerprint,
                                              "max_gather_ids": info.max_gather_ids}})

    def _scheduler(self, backend: Backend | EngineBackend) -> TokenBudgetBatcher | EngineQueue:
        """An engine that batches across requests gets each request at once (EngineQueue); otherwise the
        token-budget batcher forms the batches. Both report BackendDead to ``_backend_died``."""
        if hasattr(backend, "score_async"):
            return EngineQueue(backend, max_queue_tokens=self.config.max_queue_tokens, metrics=self.metrics,
                               on_dead=self._backend_died)
        loop = asyncio.get_running_loop()

        def score(batch: Sequence[np.ndarray], top_k: int, gather: Sequence[Gather | None] | None = None
                  ) -> list[ScoreOutput]:  # on the forward thread
            try:
                return backend.score(batch, top_k) if gather is None else backend.score(batch, top_k, gather)
            except BackendDead as dead:
                loop.call_soon_threadsafe(self._backend_died, dead)
                raise

        return TokenBudgetBatcher(score, max_batch_tokens=self.config.max_batch_tokens,
                                  max_batch_texts=self.config.max_batch_texts,
                                  max_queue_tokens=self.config.max_queue_tokens, metrics=self.metrics)

    def _backend_died(self, dead: BackendDead) -> None:
        """Reports NOT_SERVING at once and sets ``dead``: ``livefuse-teacher`` then stops and exits non-zero."""
        if self.dead.is_set():
            return
        log.error("backend died: the server stops serving and exits", extra={"fields": {"error": str(dead)}})
        self.dead.set()
        self._dying = asyncio.ensure_future(asyncio.gather(
            *(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING) for name in ("", TEACHER_SERVICE))))

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, refuses new RPCs and waits up to ``grace`` s for in-flight ones."""
        grace = self.config.grace_seconds if grace is None else grace
        log.info("draining", extra={"fields": {"grace_seconds": grace}})
        await self.health.drain()  # NOT_SERVING, and Watch streams end instead of holding the grace period
        await self.server.stop(grace)
        if self.batcher is not None:
            await self.batcher.stop()
        self.servicer.close()
        self.metrics.close()
        log.info("stopped")
