"""The gate every RPC passes before any handler code runs.

1. The bearer token, when one is configured, is checked from the call's metadata alone: a denied call gets
   UNAUTHENTICATED before its body is read, let alone parsed. The standard health service answers without
   a token: it tells only SERVING / NOT_SERVING, and load balancers, Kubernetes gRPC probes and gRPC's own
   client-side health checking cannot send one.
2. Requests are parsed here instead of inside grpcio, so a message that does not parse gets
   INVALID_ARGUMENT naming its type (grpcio itself answers UNKNOWN before any handler runs): every unary
   request, and ScoreStream's messages, whose servicer learns which one broke the stream.
Both outcomes are counted in ``livefuse_teacher_requests_total``.
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from protos.service import TEACHER_SERVICE
from teacher_server.metrics import TeacherMetrics

DENIED = "missing or invalid bearer token"
TEACHER_PREFIX = f"/{TEACHER_SERVICE}/"  # its only stream-request: ScoreStream
HEALTH_PREFIX = "/grpc.health.v1.Health/"
Deserializer = Callable[[bytes], Any]


class UnparseableMessage(Exception):
    """A message of a request stream that does not parse (the stream cannot go on past it)."""


async def _deny(_requests: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


# A stream-request handler reads messages only when asked to: the denied call's body is never read.
_DENY = grpc.stream_stream_rpc_method_handler(_deny)


class RequestGate(grpc.aio.ServerInterceptor):
    def __init__(self, token: str | None, metrics: TeacherMetrics) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self._metrics = metrics

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        if self._expected is None or details.method.startswith(HEALTH_PREFIX):
            return True
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        return hmac.compare_digest(str(given).encode(), self._expected)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method.rsplit("/", 1)[-1]
        if not self._authorized(details):
            self._metrics.requests.labels(method, "UNAUTHENTICATED").inc()
            return _DENY
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.request_streaming and not details.method.startswith(TEACHER_PREFIX):
            return handler  # other services' streams (reflection) keep grpcio's parsing
        return self._parsing(handler, method)

    def _parsing(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The same handler, taking raw bytes and parsing them itself."""
        parse = handler.request_deserializer
        message_type = getattr(parse, "__self__", None)  # generated code passes SomeRequest.FromString
        type_name = message_type.DESCRIPTOR.full_name if hasattr(message_type, "DESCRIPTOR") else "the request type"
        serialize = handler.response_serializer
        if handler.request_streaming:
            inner_stream = handler.stream_stream

            async def stream_stream(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
                async for response in inner_stream(self._parse_each(raw, parse, method, type_name), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, response_serializer=serialize)

        async def one(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                return parse(raw)
            except Exception as err:  # whatever the parser raises, the bytes were not a valid message
                self._metrics.requests.labels(method, "INVALID_ARGUMENT").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request does not parse as {type_name}: {err}")

        if handler.response_streaming:
            inner_unary_stream = handler.unary_stream

            async def yielding(raw: bytes, context: grpc.aio.ServicerContext):
                async for response in inner_unary_stream(await one(raw, context), context):
                    yield response

            async def writing(raw: bytes, context: grpc.aio.ServicerContext) -> None:  # context.write style
                await inner_unary_stream(await one(raw, context), context)

            wrapped = yielding if inspect.isasyncgenfunction(inner_unary_stream) else writing
            return grpc.unary_stream_rpc_method_handler(wrapped, response_serializer=serialize)
        inner_unary = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await inner_unary(await one(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)

    async def _parse_each(self, raw: AsyncIterator[bytes], parse: Deserializer, method: str,
                          type_name: str) -> AsyncIterator[Any]:
        index = 0
        async for message in raw:
            index += 1
            try:
                request = parse(message)
            except Exception as err:
                self._metrics.requests.labels(method, "INVALID_ARGUMENT").inc()
                raise UnparseableMessage(f"message #{index} of the stream does not parse as {type_name}: "
                                         f"{err}; the stream ends here") from None
            yield request
