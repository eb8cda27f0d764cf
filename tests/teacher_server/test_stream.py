"""ScoreStream under abuse: a message that does not parse never ends the stream with OK and never throws
away the responses already computed; a client that stops reading stops the server from reading (per-stream
flow control); error responses name the tokenizer like every other response."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from student_trainer.trainer.client import TeacherClient
from teacher_server.background import BackgroundServer
from tests.doubles import ControlledBackend

from .conftest import make_config

pytestmark = pytest.mark.integration
STREAM = "/livefuse.v1.Teacher/ScoreStream"


def corrupt_utf8(request: pb.ScoreRequest) -> bytes:
    """``request`` serialized, with the first byte of its first text replaced by 0xFF (invalid UTF-8, as a
    JavaScript client sends for a lone surrogate)."""
    raw = bytearray(request.SerializeToString())
    raw[raw.index(request.texts[0].encode())] = 0xFF
    return bytes(raw)


def raw_stream(channel: grpc.Channel):
    """ScoreStream with bytes in and bytes out: what a client in another language puts on the wire."""
    return channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)


def scored_count(server: BackgroundServer, method: str = "ScoreStream", code: str = "OK") -> float:
    assert server.server is not None
    value = server.server.metrics.registry.get_sample_value(
        "livefuse_teacher_requests_total", {"method": method, "code": code})
    return value or 0.0


@pytest.fixture
def held(tiny_model_dirs, loaded):
    """A server whose forwards wait for the test to release them (real model underneath)."""
    backend, tokenizer = loaded["gpt2"]
    gate = ControlledBackend(backend, hold_after=0)
    with BackgroundServer(make_config(tiny_model_dirs["gpt2"], warmup=False), gate, tokenizer) as server, \
            TeacherClient(f"127.0.0.1:{server.port}", timeout=60) as client:
        yield server, gate, client
        gate.stop_holding()


def test_unparseable_message_flushes_in_flight_responses_then_ends_not_ok(held):
    server, gate, client = held
    good = [client.request([f"valid text number {i}"], top_k=3) for i in range(2)]
    bad = corrupt_utf8(client.request(["broken text"], top_k=3))
    sent = threading.Event()

    def requests() -> Iterator[bytes]:
        yield from (r.SerializeToString() for r in good)
        yield bad
        sent.set()
        yield client.request(["after the broken one"], top_k=3).SerializeToString()

    call = raw_stream(client.channel)(requests(), timeout=60)
    assert sent.wait(30)
    gate.held.wait(10)
    time.sleep(0.5)  # the server has read the broken message while both valid ones wait in the forward
    gate.stop_holding()
    got = []
    with pytest.raises(grpc.RpcError) as err:
        got.extend(pb.ScoreResponse.FromString(raw) for raw in call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
    assert "does not parse" in err.value.details() and "#3" in err.value.details(), err.value.details()
    assert sorted(r.request_id for r in got) == sorted(r.request_id for r in good)
    assert all(len(r.results) == 1 and not r.HasField("error") for r in got)
    assert scored_count(server, code="INVALID_ARGUMENT") == 1  # the parse failure is counted


def test_unparseable_first_message_is_not_ok(held):
    server, gate, client = held
    gate.stop_holding()
    call = raw_stream(client.channel)(iter([corrupt_utf8(client.request(["x"], top_k=2))]), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.score(["the server still answers"], top_k=2)


def test_error_responses_carry_the_tokenizer_fingerprint(held):
    _, gate, client = held
    gate.stop_holding()
    fingerprint = client.info().tokenizer_fingerprint
    requests = [client.request(["fine"], top_k=2), pb.ScoreRequest(texts=[""], request_id="empty"),
                pb.ScoreRequest(texts=["x"], top_k=10_000, request_id="big-k")]
    responses = list(client.score_stream(requests))
    assert len(responses) == 3 and sum(r.HasField("error") for r in responses) == 2
    assert all(r.tokenizer_fingerprint == fingerprint for r in responses)


def _settled(server: BackgroundServer, quiet_s: float = 2.0, limit_s: float = 120.0) -> float:
    """Requests the server has answered on ScoreStream, once it is idle: nothing queued and the count
    unchanged for ``quiet_s`` seconds."""
    assert server.server is not None
    registry = server.server.metrics.registry
    last, since, start = scored_count(server), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - start < limit_s:
        time.sleep(0.1)
        value = scored_count(server)
        if value != last or registry.get_sample_value("livefuse_teacher_queue_texts"):
            last, since = value, time.monotonic()
    return last


def test_a_client_that_does_not_read_stops_the_server_reading(tiny_model_dirs, loaded):
    """Default limits: at most stream_max_pending requests read and unanswered, whatever the client sends."""
    backend, tokenizer = loaded["gpt2"]
    config = make_config(tiny_model_dirs["gpt2"])
    text = "A sentence that makes a response of about 30 kB at k = 64 in fp32. " * 4
    # the client announces a fixed 64 kB HTTP/2 window (no BDP probing), so the transport holds at most a
    # few responses and what the test counts is the server's own buffering
    with BackgroundServer(config, backend, tokenizer) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)]) as channel:
        requests = [pb.ScoreRequest(texts=[text], top_k=64, logprob_format=pb.LOGPROB_FORMAT_FLOAT32, request_id=str(i))
                    for i in range(120)]  # over 3x what the server may read ahead
        call = pb_grpc.TeacherStub(channel).ScoreStream(iter(requests), timeout=120)  # not read for now
        scored = _settled(server)
        assert scored <= config.stream_max_pending + 4, scored
        responses = list(call)  # reading again lets the server go on to the end
    assert len(responses) == 120 and not any(r.HasField("error") for r in responses)

