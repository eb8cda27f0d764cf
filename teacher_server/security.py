"""Transport security and authentication for the teacher server.

TLS: a server certificate (and, when ``tls_client_ca`` is set, required client certificates: mutual TLS).
Auth: a bearer token file; the token is checked on every RPC by ``teacher_server.gate.RequestGate``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from teacher_server.config import TeacherConfig

log = logging.getLogger("livefuse.teacher.security")


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
