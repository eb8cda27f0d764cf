"""The standing hostile-client suite: random bytes on every method, values at every limit and one past it,
weird Unicode, stream abuse. Every case is seeded and bounded. After each part the server is healthy, its
queue is empty, and a reference request returns the same bytes it returned before the abuse.

The fast part runs in the default lane; ``slow`` runs the same attacks at ten times the count, plus
corrupted valid messages and many clients at once.
"""

from __future__ import annotations

import concurrent.futures
import string
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import teacher_pb2 as pb
from protos.scores import decode_scores
from student_trainer.trainer.client import TeacherClient
from teacher_server.background import BackgroundServer
from teacher_server.limits import MAX_REQUEST_ID_CHARS

from .conftest import make_config

pytestmark = pytest.mark.integration

LIMITS = dict(max_texts_per_request=4, max_top_k=16, max_tokens_per_text=32, max_tokens_per_request=80,
              max_chars_per_text=400, max_batch_tokens=256, max_message_bytes=256 * 1024, stream_max_pending=8)
# every method of every service, with its kind
METHODS = {
    "/livefuse.v1.Teacher/GetInfo": "unary_unary",
    "/livefuse.v1.Teacher/GetVocab": "unary_stream",
    "/livefuse.v1.Teacher/Score": "unary_unary",
    "/livefuse.v1.Teacher/ScoreStream": "stream_stream",
    "/grpc.health.v1.Health/Check": "unary_unary",
    "/grpc.health.v1.Health/Watch": "unary_stream",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "stream_stream",
}
# Codes a hostile call may end with. Never UNKNOWN or INTERNAL on our own service (a crash, or a parse error
# we did not catch); grpcio still answers a broken reflection message with UNKNOWN itself.
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
REFERENCE = pb.ScoreRequest(texts=["The reference text: def f(x):\n    return x + 1", "Zwei Wörter"], top_k=7,
                            logprob_format=pb.LOGPROB_FORMAT_FLOAT32, request_id="reference")


@pytest.fixture(scope="module")
def hostile(tiny_model_dirs, loaded):
    """One server with small limits, the reference response's bytes, and a client."""
    backend, tokenizer = loaded["gpt2"]
    with BackgroundServer(make_config(tiny_model_dirs["gpt2"], **LIMITS), backend, tokenizer) as server, \
            TeacherClient(f"127.0.0.1:{server.port}", timeout=60, max_attempts=1) as client:
        reference = client.stub.Score(REFERENCE, timeout=60).SerializeToString()
        yield server, client, reference, tokenizer


def assert_unharmed(hostile) -> None:
    """Healthy, nothing left in the queue, and the reference request answered with identical bytes."""
    server, client, reference, _ = hostile
    health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    registry = server.server.metrics.registry
    deadline = time.monotonic() + 30  # cancelled work drains from the forward
    while registry.get_sample_value("livefuse_teacher_queue_texts") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registry.get_sample_value("livefuse_teacher_queue_texts") == 0
    assert registry.get_sample_value("livefuse_teacher_queue_tokens") == 0
    assert client.stub.Score(REFERENCE, timeout=60).SerializeToString() == reference


def raw_call(channel: grpc.Channel, method: str, bodies: list[bytes], timeout: float = 10) -> grpc.StatusCode:
    """Sends ``bodies`` (one for a unary request) to ``method`` as raw bytes; returns the final status."""
    kind = METHODS[method]
    call = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
    try:
        if kind == "unary_unary":
            call(bodies[0], timeout=timeout)
        elif kind == "unary_stream":
            for _ in call(bodies[0], timeout=timeout):
                pass
        else:
            for _ in call(iter(bodies), timeout=timeout):
                pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def random_bodies(rng: np.random.Generator, count: int) -> Iterator[bytes]:
    """Random bytes of random lengths, some starting like a real message (a field tag the parser accepts)."""
    for _ in range(count):
        body = rng.integers(0, 256, int(rng.integers(0, 600)), dtype=np.uint8).tobytes()
        yield (b"\x0a" + bytes([len(body) % 128]) + body) if rng.random() < 0.3 else body


def random_bytes_on_every_method(hostile, seed: int, per_method: int) -> None:
    server, client, _, _ = hostile
    rng = np.random.default_rng(seed)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method in METHODS:
            for body in random_bodies(rng, per_method):
                bodies = [body] if METHODS[method] != "stream_stream" else [body] * int(rng.integers(1, 4))
                code = raw_call(channel, method, bodies, timeout=2 if method.endswith("Watch") else 10)
                if method.startswith("/livefuse"):
                    assert code not in FORBIDDEN, (method, body[:40], code)
                elif method.endswith("Watch"):  # a body that parses watches a service: ends at the deadline
                    assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INVALID_ARGUMENT), code
    assert_unharmed(hostile)


def test_random_bytes_on_every_method(hostile):
    random_bytes_on_every_method(hostile, seed=11, per_method=12)


def exactly(tokenizer, tokens: int) -> str:
    """A text the server's tokenizer cuts into exactly ``tokens`` tokens (GPT-2: " word" is one token)."""
    text = "word" + " word" * (tokens - 1)
    assert len(tokenizer.encode([text])[0].ids) == tokens
    return text


OK, INVALID, TOO_BIG = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
LIMIT_CASES = [
    # (name, request fields, the code expected, the limit the refusal names) -- each limit, and one past it
    ("texts at max", lambda t: dict(texts=["a"] * 4), OK, ""),
    ("texts over max", lambda t: dict(texts=["a"] * 5), INVALID, "max_texts_per_request=4"),
    ("no texts", lambda t: dict(texts=[]), INVALID, "no texts"),
    ("top_k 0 is the default", lambda t: dict(texts=["a"], top_k=0), OK, ""),
    ("top_k 1", lambda t: dict(texts=["a"], top_k=1), OK, ""),
    ("top_k at max", lambda t: dict(texts=["a"], top_k=16), OK, ""),
    ("top_k over max", lambda t: dict(texts=["a"], top_k=17), INVALID, "max_top_k=16"),
    ("top_k uint32 max", lambda t: dict(texts=["a"], top_k=2**32 - 1), INVALID, "max_top_k=16"),
    # GPT-2 has a token for 32 "=": 400 of them are a few tokens
    ("chars at max", lambda t: dict(texts=["=" * 400]), OK, ""),
    ("chars over max", lambda t: dict(texts=["=" * 401]), INVALID, "max_chars_per_text=400"),
    ("chars over max, truncate", lambda t: dict(texts=["b" * 401], truncate=True), OK, ""),
    ("tokens at max", lambda t: dict(texts=[exactly(t, 32)]), OK, ""),
    ("tokens over max", lambda t: dict(texts=[exactly(t, 33)]), INVALID, "max_tokens_per_text=32"),
    ("tokens over max, truncate", lambda t: dict(texts=[exactly(t, 33)], truncate=True), OK, ""),
    ("request tokens at max", lambda t: dict(texts=[exactly(t, 32), exactly(t, 32), exactly(t, 16)]), OK, ""),
    ("request tokens over max", lambda t: dict(texts=[exactly(t, 32), exactly(t, 32), exactly(t, 17)]), INVALID,
     "max_tokens_per_request=80"),
    ("request_id at max", lambda t: dict(texts=["a"], request_id="r" * MAX_REQUEST_ID_CHARS), OK, ""),
    ("request_id over max", lambda t: dict(texts=["a"], request_id="r" * (MAX_REQUEST_ID_CHARS + 1)), INVALID,
     "request_id"),
    ("format at max", lambda t: dict(texts=["a"], logprob_format=2), OK, ""),
    ("format over max", lambda t: dict(texts=["a"], logprob_format=3), INVALID, "logprob_format"),
    ("format negative", lambda t: dict(texts=["a"], logprob_format=-1), INVALID, "logprob_format"),
    ("empty text", lambda t: dict(texts=["a", ""]), INVALID, "texts[1]"),
    ("message over max_message_bytes", lambda t: dict(texts=["x" * 300_000], truncate=True), TOO_BIG, "larger"),
]


@pytest.mark.parametrize("case", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_every_limit_and_one_past_it(hostile, case):
    _, client, _, tokenizer = hostile
    name, fields, expected, named = case
    request = pb.ScoreRequest(**fields(tokenizer))
    try:
        response, code, details = client.stub.Score(request, timeout=30), OK, ""
    except grpc.RpcError as err:
        response, code, details = None, err.code(), err.details()
    assert code == expected and named in details, (name, code, details)
    if response is not None:
        assert len(response.results) == len(request.texts)
        for text, result in zip(request.texts, response.results, strict=True):
            scores = decode_scores(result)
            assert len(scores.input_ids) <= 32 and scores.offsets.max() <= len(text)
    if expected != TOO_BIG:  # the same answer in band on a stream (an oversized message fails the stream)
        (streamed,) = client.score_stream([request])
        assert streamed.error.code == (0 if expected == OK else expected.value[0]), (name, streamed.error)


def test_vocabulary_chunk_sizes_at_the_edges(hostile):
    _, client, _, _ = hostile
    whole = client.vocab()
    for size in (1000, 2**32 - 1):  # (1 is in the slow lane: one message per token)
        chunks = list(client.stub.GetVocab(pb.GetVocabRequest(chunk_size=size), timeout=60))
        assert [t for c in chunks for t in c.tokens] == whole
        assert all(c.ByteSize() <= LIMITS["max_message_bytes"] for c in chunks)
    assert_unharmed(hostile)


WEIRD = [
    "\u0000", "\u0000a\u0000", "\ufeffBOM first", "\ufffe\uffff", "\u200b", "\u200d\u200d\u200d",
    "e\u0301\u0302\u0303\u0304\u0305\u0306", "Z\u0351\u0352\u0357\u035b\u0346\u0343" * 8, "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u202eRTL override\u202c", "\U000e0041\U000e007f", "\U0010ffff", "\ue000\uf8ff", "\t\n\r\x0b\x0c",
    "   ", "\n" * 50, "﷽", "ﷺ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u0345\u0345", "a\u0308\u0308\u0308" * 20,
]


def weird_texts(rng: np.random.Generator, count: int) -> Iterator[str]:
    """The fixed cases above, then seeded random code points from every plane (no lone surrogates: a Python
    client cannot encode them; invalid UTF-8 on the wire is the random-bytes and stream tests' job)."""
    yield from WEIRD
    for _ in range(count):
        points = rng.integers(0, 0x110000, int(rng.integers(1, 40)))
        yield "".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF) or "x"


def weird_unicode(hostile, seed: int, count: int) -> None:
    _, client, _, tokenizer = hostile
    rng = np.random.default_rng(seed)
    texts = list(weird_texts(rng, count))
    for start in range(0, len(texts), 2):  # two texts of at most 32 tokens fit max_tokens_per_request
        batch = texts[start:start + 2]
        results = client.score(batch, top_k=5, truncate=True)
        for text, got in zip(batch, results, strict=True):
            expected = tokenizer.encode([text[:LIMITS["max_chars_per_text"]]])[0]
            np.testing.assert_array_equal(got.input_ids, expected.ids[:32])
            assert got.offsets.max() <= len(text) and (got.topk_ids < client.info().vocab_size).all()
            assert np.isfinite(got.topk_logprobs).all() and got.next_logprobs.shape == (len(got.input_ids) - 1,)
    assert_unharmed(hostile)


def test_weird_unicode(hostile):
    weird_unicode(hostile, seed=5, count=20)


def _corrupt_utf8(request: pb.ScoreRequest) -> bytes:
    raw = bytearray(request.SerializeToString())
    raw[raw.index(request.texts[0].encode())] = 0xC0  # an overlong encoding lead byte: never valid UTF-8
    return bytes(raw)


def stream_abuse(hostile, in_flight: int) -> None:
    server, client, _, _ = hostile
    stub_call = client.stub.ScoreStream
    # hundreds in flight on one stream, all answered and matched by request_id
    requests = [client.request([f"request {i} " * (1 + i % 5)], top_k=1 + i % 16) for i in range(in_flight)]
    answered = {r.request_id: r for r in stub_call(iter(requests), timeout=120)}
    assert set(answered) == {r.request_id for r in requests}
    assert not any(r.HasField("error") for r in answered.values())
    # cancelled mid-stream after a few answers
    call = stub_call(iter(requests), timeout=120)
    for _ in zip(range(5), call, strict=False):
        pass
    call.cancel()
    # half-closed at once: no requests, ends OK with no responses
    assert list(stub_call(iter([]), timeout=30)) == []
    # never read, then abandoned (cancelled) while the server holds what it may
    idle = stub_call(iter(requests), timeout=120)
    time.sleep(0.5)
    idle.cancel()
    # requests sent and the client gone before any answer, on many streams at once
    for _ in range(in_flight // 20):
        gone = stub_call(iter(requests[:20]), timeout=120)
        gone.cancel()
    # a broken message after valid ones, raw bytes
    raw = client.channel.stream_stream("/livefuse.v1.Teacher/ScoreStream", request_serializer=None,
                                       response_deserializer=None)
    bodies = [r.SerializeToString() for r in requests[:3]] + [_corrupt_utf8(requests[3])]
    got = []
    with pytest.raises(grpc.RpcError) as err:
        got.extend(raw(iter(bodies), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(got) == 3
    assert_unharmed(hostile)


def test_stream_abuse(hostile):
    stream_abuse(hostile, in_flight=200)


@pytest.mark.slow
def test_random_bytes_on_every_method_at_length(hostile):
    random_bytes_on_every_method(hostile, seed=12, per_method=120)


@pytest.mark.slow
def test_weird_unicode_at_length(hostile):
    weird_unicode(hostile, seed=6, count=400)


@pytest.mark.slow
def test_stream_abuse_at_length(hostile):
    stream_abuse(hostile, in_flight=1000)


@pytest.mark.slow
def test_vocabulary_one_token_per_chunk(hostile):
    _, client, _, _ = hostile
    chunks = list(client.stub.GetVocab(pb.GetVocabRequest(chunk_size=1), timeout=300))
    assert [t for c in chunks for t in c.tokens] == client.vocab()


@pytest.mark.slow
def test_corrupted_valid_messages(hostile):
    """Seeded bit flips and cuts in valid requests: each parses to something checked, or is refused."""
    server, client, _, _ = hostile
    rng = np.random.default_rng(21)
    valid = REFERENCE.SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for _ in range(500):
            body = bytearray(valid[:int(rng.integers(0, len(valid) + 1))] if rng.random() < 0.3 else valid)
            for position in rng.integers(0, max(len(body), 1), int(rng.integers(1, 6))):
                if body:
                    body[position] ^= 1 << int(rng.integers(0, 8))
            code = raw_call(channel, "/livefuse.v1.Teacher/Score", [bytes(body)])
            assert code not in FORBIDDEN, (bytes(body)[:40], code)
    assert_unharmed(hostile)


@pytest.mark.slow
def test_many_clients_mixing_valid_and_hostile_requests(hostile):
    """16 clients at once, half of them hostile: every valid request gets its own right answer."""
    server, _, _, _ = hostile
    address = f"127.0.0.1:{server.port}"
    alphabet = string.ascii_letters + " \n\u00e9\u4e2d\U0001f600"
    failures: list[str] = []
    lock = threading.Lock()

    def valid(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with TeacherClient(address, timeout=120, max_attempts=1) as c:
            for _ in range(15):
                text = "".join(rng.choice(list(alphabet), int(rng.integers(1, 120))))
                alone = c.score([text], top_k=3, truncate=True, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)[0]
                again = c.score([text, "other"], top_k=3, truncate=True, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)[0]
                if not (np.array_equal(alone.input_ids, again.input_ids)
                        and np.allclose(alone.topk_logprobs, again.topk_logprobs, atol=1e-5)):
                    with lock:
                        failures.append(f"client {seed}: another answer in a batch than alone")

    def hostile_client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(address) as channel:
            for body in random_bodies(rng, 40):
                method = list(METHODS)[int(rng.integers(0, 4))]  # the Teacher methods
                raw_call(channel, method, [body])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(valid if i % 2 else hostile_client, 100 + i) for i in range(16)]
        for future in futures:
            future.result(timeout=600)
    assert not failures
    assert_unharmed(hostile)
