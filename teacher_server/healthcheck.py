"""Asks a teacher's standard gRPC health service whether it is SERVING (the Docker HEALTHCHECK).

    python -m teacher_server.healthcheck [--host 127.0.0.1] [--port 50051] [--timeout 5]
    python -m teacher_server.healthcheck --tls-ca ca.pem --tls-server-name teacher-llama2 --auth-token-file token

Exit 0 only when the answer is SERVING; otherwise exit 1 with one line on stderr that says what was seen
(NOT_SERVING while the model loads or drains, nothing listening, deadline exceeded, ...). Imports only
grpc and the health stubs, so a probe every few seconds stays cheap (no torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.service import TEACHER_SERVICE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m teacher_server.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="teacher address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="teacher gRPC port (default: 50051)")
    parser.add_argument("--service", default=TEACHER_SERVICE,
                        help=f"health service name to ask about; '' = the whole server (default: {TEACHER_SERVICE})")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of the Check call in seconds (default: 5)")
    parser.add_argument("--tls-ca", default=None, help="PEM CA to trust; enables TLS (teacher started with --tls-cert)")
    parser.add_argument("--tls-server-name", default=None, help="name to check in the server certificate")
    parser.add_argument("--auth-token-file", default=None, help="file with the bearer token the teacher requires")
    return parser


def _channel(args: argparse.Namespace) -> grpc.Channel:
    target = f"{args.host}:{args.port}"
    if args.tls_ca is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(args.tls_ca).read_bytes())
    return grpc.secure_channel(target, credentials, options=options)


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """(is SERVING, a one-line description of what the health service said or why it could not answer)."""
    target = f"{args.host}:{args.port}"
    metadata = ()
    if args.auth_token_file:
        metadata = (("authorization", f"Bearer {Path(args.auth_token_file).read_text().strip()}"),)
    with _channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout,
                                  metadata=metadata)
        except grpc.RpcError as err:
            return False, f"{target}: health check failed: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{target} {args.service!r}: {status}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        serving, message = check(args)
    except OSError as err:
        serving, message = False, f"cannot read a credentials file: {err}"
    print(f"healthcheck: {message}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
