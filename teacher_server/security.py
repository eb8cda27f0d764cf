"""Transport security and authentication for the teacher server.

TLS: a server certificate (and, when ``tls_client_ca`` is set, required client certificates: mutual TLS).
Auth: a bearer token checked on every RPC (health and reflection included) in constant time; a request
without valid credentials gets UNAUTHENTICATED and nothing else.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from teacher_server.config import TeacherConfig

log = logging.getLogger("livefuse.teacher.security")
DENIED = "missing or invalid bearer token"


def read_secret(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{what}: cannot read {path}: {err.strerror}") from None
    if not data.strip():
        raise ValueError(f"{what}: {path} is empty")
    return data


def server_credentials(config: TeacherConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config, or None for plaintext."""
    if config.tls_cert is None:
        return None
    client_ca = read_secret(config.tls_client_ca, "tls_client_ca") if config.tls_client_ca else None
    pair = (read_secret(config.tls_key, "tls_key"), read_secret(config.tls_cert, "tls_cert"))  # type: ignore[arg-type]
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def load_token(config: TeacherConfig) -> str | None:
    if config.auth_token_file is None:
        return None
    token = read_secret(config.auth_token_file, "auth_token_file").decode().strip()
    if config.tls_cert is None:
        log.warning("auth token without TLS: the token crosses the network in clear text")
    return token


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only answers UNAUTHENTICATED."""
    async def deny(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    kinds: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for attr, make in kinds.items():
        if getattr(handler, attr) is not None:
            return make(deny, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    raise AssertionError("handler of unknown kind")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if handler is None or hmac.compare_digest(str(given).encode(), self._expected):
            return handler
        return _denying(handler)
