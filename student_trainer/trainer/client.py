"""Client for one teacher service (one source model, one or more replica endpoints).

    client = TeacherClient(["10.0.0.5:50051", "10.0.0.6:50051"])   # replicas, round-robin
    info, vocab = client.info(), client.vocab()
    scores = client.score(["some text"], top_k=10)                   # list[TeacherScores]
    if info.max_gather_ids:                                          # log-probs at ids of our choosing
        scores = client.score(["some text"], gather=[([4, 9], [[17, 3], [5, -1]])])  # (ends, ids) per text

Every call has a deadline. Replicas are picked round-robin among those whose standard health service says
SERVING (gRPC's client-side health checking): a replica still loading or draining gets no calls. gRPC's own
retry policy retries UNAVAILABLE with backoff, on the next replica the round-robin picks: a replica going
away, or one refusing a request at once because the work queued ahead would outlast its deadline (the
teacher's overload answer). A request whose response could never fit the teacher's ``max_message_bytes``
raises ``ResponseTooLarge`` (the teacher's reason RESPONSE_TOO_LARGE, ``protos.errors``); other codes
surface as ``grpc.RpcError`` at once.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from numpy.typing import ArrayLike

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.errors import RESPONSE_TOO_LARGE, error_info
from protos.scores import TeacherScores, decode_scores, encode_gather
from protos.service import TEACHER_SERVICE
from student_trainer.trainer.config import ConfigError

GatherArrays = tuple[ArrayLike, ArrayLike]
"""One text's gather: ends (m,) character offsets and ids (m, c) teacher ids (negative: padding)."""


def service_config(max_attempts: int) -> dict:
    """Round-robin over the SERVING endpoints; gRPC retries UNAVAILABLE itself (attempts include the first;
    1: none). UNAVAILABLE, not RESOURCE_EXHAUSTED, is retried: the teacher answers overload with it, and
    RESOURCE_EXHAUSTED also means "message too large", which no retry can fix."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}],
                    "healthCheckConfig": {"serviceName": TEACHER_SERVICE}}
    if max_attempts >= 2:
        config["methodConfig"] = [{
            "name": [{"service": TEACHER_SERVICE}],
            "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
        }]
    return config


def _ipv4_addresses(endpoint: str) -> list[str]:
    """``host:port`` -> ``["a.b.c.d:port", ...]`` (a literal IPv4 address as is, a name resolved now)."""
    host, _, port = endpoint.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        return [endpoint]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, ValueError) as err:
        raise ConfigError(f"endpoint {endpoint!r}: cannot resolve {host!r}: {err}") from None
    return sorted({f"{info[4][0]}:{port}" for info in infos})


def channel_target(endpoints: str | Sequence[str]) -> str:
    """One gRPC target for one or more ``host:port`` endpoints.

    One endpoint is passed as is (gRPC's DNS resolver finds every address of a name, e.g. compose
    replicas). Several are resolved to IPv4 addresses for the ``ipv4:`` list scheme, so client-side
    round-robin spreads requests over all of them.
    """
    if isinstance(endpoints, str):
        return endpoints
    if len(endpoints) == 1:
        return endpoints[0]
    addresses = [a for e in endpoints for a in _ipv4_addresses(e)]
    return "ipv4:" + ",".join(dict.fromkeys(addresses))


class FingerprintMismatch(RuntimeError):
    """A response came from a teacher with another tokenizer than the one this client was set up for."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"the teacher answered with tokenizer {got or '(none)'}; expected {expected}")
        self.expected, self.got = expected, got


class ResponseTooLarge(RuntimeError):
    """The teacher refused a request because its response could exceed the teacher's ``max_message_bytes``
    (RESOURCE_EXHAUSTED with reason RESPONSE_TOO_LARGE): the same request can never succeed, unlike a busy
    teacher's RESOURCE_EXHAUSTED. The sizes are None if the teacher did not send them."""

    def __init__(self, details: str, max_message_bytes: int | None, response_bytes: int | None) -> None:
        super().__init__(details)
        self.max_message_bytes, self.response_bytes = max_message_bytes, response_bytes


def _raise_if_too_large(err: grpc.RpcError) -> None:
    info = error_info(err)
    if info is None or info.reason != RESPONSE_TOO_LARGE:
        return
    sizes = [info.metadata.get(key, "") for key in ("max_message_bytes", "response_bytes")]
    limit, size = (int(v) if v.isdigit() else None for v in sizes)
    raise ResponseTooLarge(err.details() or "", limit, size) from None


@dataclass(frozen=True)
class ClientTLS:
    """TLS towards a teacher: CA to trust (None: system roots), optional client certificate (mutual TLS),
    optional name to check in the server certificate instead of the endpoint's host."""

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_cert), private_key=read(self.client_key),
                                            certificate_chain=read(self.client_cert))


class TeacherClient:
    def __init__(self, endpoints: str | Sequence[str], *, timeout: float = 60.0, max_attempts: int = 5,
                 tls: ClientTLS | None = None, token: str | None = None,
                 max_message_bytes: int = 256 * 1024 * 1024, channel: grpc.Channel | None = None) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.service_config", json.dumps(service_config(max_attempts))),
                   ("grpc.enable_retries", 1)]
        if tls is not None and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        self.target = channel_target(endpoints)
        if channel is None:
            channel = (grpc.secure_channel(self.target, tls.credentials(), options=options) if tls is not None
                       else grpc.insecure_channel(self.target, options=options))
        self.channel = channel
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb_grpc.TeacherStub(self.channel)
        self.timeout = timeout
        self._ids = itertools.count()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


    def info(self, timeout: float | None = None) -> pb.TeacherInfo:
        return self.stub.GetInfo(pb.GetInfoRequest(), timeout=timeout or self.timeout, wait_for_ready=True,
                                 metadata=self.metadata)

    def vocab(self, timeout: float | None = None) -> list[str]:
        tokens: list[str] = []
        chunks = self.stub.GetVocab(pb.GetVocabRequest(), timeout=timeout or self.timeout, wait_for_ready=True,
                                    metadata=self.metadata)
        for chunk in chunks:
            if chunk.start_id != len(tokens):
                raise RuntimeError(f"GetVocab chunk starts at id {chunk.start_id}, expected {len(tokens)}")
            tokens.extend(chunk.tokens)
        return tokens

    def request(self, texts: Sequence[str], top_k: int = 10, truncate: bool = False,
                logprob_format: int = pb.LOGPROB_FORMAT_FLOAT16, gather: Sequence[GatherArrays] | None = None
                ) -> pb.ScoreRequest:
        """A ScoreRequest; ``gather``: one ``(ends, ids)`` per text (see ``score``)."""
        specs = [encode_gather(ends, ids) for ends, ids in gather] if gather is not None else []
        return pb.ScoreRequest(texts=list(texts), top_k=top_k, truncate=truncate, logprob_format=logprob_format,
                               request_id=str(next(self._ids)), gather=specs)

    def score(self, texts: Sequence[str], top_k: int = 10, truncate: bool = False,
              logprob_format: int = pb.LOGPROB_FORMAT_FLOAT16, timeout: float | None = None,
              expect_fingerprint: str | None = None, gather: Sequence[GatherArrays] | None = None
              ) -> list[TeacherScores]:
        """Scores ``texts``; with ``expect_fingerprint``, raises FingerprintMismatch if another tokenizer answered,
        and ResponseTooLarge if the response could never fit the teacher's message limit.

        ``gather``: one ``(ends (m,), ids (m, c))`` per text — character offsets into the text, strictly
        increasing, and this teacher's ids (negative: padding) — asks the log-probs of ``ids[i]`` at the
        teacher position that has read exactly ``text[:ends[i]]`` (teacher.proto, GatherSpec). They come back
        as each TeacherScores' ``gathered_logprobs (m, c)`` (-inf: padding, or no teacher token ends there);
        without ``gather`` it is None. Only for a teacher whose ``info().max_gather_ids`` is above 0 (at most
        that many ids per call); others answer FAILED_PRECONDITION."""
        try:
            response = self.stub.Score(self.request(texts, top_k, truncate, logprob_format, gather),
                                       timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            _raise_if_too_large(err)
            raise
        if expect_fingerprint is not None and response.tokenizer_fingerprint != expect_fingerprint:
            raise FingerprintMismatch(expect_fingerprint, response.tokenizer_fingerprint)
        return [decode_scores(r) for r in response.results]

    def score_stream(self, requests: Iterable[pb.ScoreRequest], timeout: float | None = None
                     ) -> Iterator[pb.ScoreResponse]:
        """Sends every request on one ScoreStream (all in flight at once); yields responses as they finish."""
        return self.stub.ScoreStream(iter(requests), timeout=timeout or self.timeout, metadata=self.metadata)
