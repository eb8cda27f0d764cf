"""A source whose responses can never fit the teacher's message limit fails at once under every policy,
naming the limit and what to change, against a real teacher on loopback; a busy teacher's
RESOURCE_EXHAUSTED stays a transient failure."""

from __future__ import annotations

import threading
import time

import pytest

from student_trainer.trainer.client import TeacherClient
from student_trainer.trainer.config import SourceConfig
from student_trainer.trainer.sources import Source, SourceFailed
from teacher_server.backends.hf import load_hf
from teacher_server.background import BackgroundServer
from teacher_server.config import TeacherConfig
from tests.doubles import ControlledBackend

from .helpers import teacher_config

pytestmark = pytest.mark.integration
LIMIT = 64 * 1024
TEXT = "words and more words " * 60  # ~300 gpt2 tokens: ~80 kB at k = 64 in fp16, ~5 kB at k = 2


@pytest.fixture(scope="module")
def small_limit(tiny_model_dirs):
    """A teacher whose max_message_bytes is too small for what its other limits allow (the start-up check
    bypassed, as an operator's hand-made limits or an older teacher can): some responses never fit."""
    valid = teacher_config(tiny_model_dirs["gpt2"])
    backend, tokenizer = load_hf(valid)
    config = TeacherConfig.model_construct(**{**valid.model_dump(), "max_message_bytes": LIMIT})
    recording = ControlledBackend(backend)
    with BackgroundServer(config, recording, tokenizer) as server:
        yield server, recording


def _counted(server: BackgroundServer, code: str) -> float:
    assert server.server is not None
    return server.server.metrics.registry.get_sample_value(
        "livefuse_teacher_requests_total", {"method": "Score", "code": code}) or 0.0


def _wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def _fetch(source: Source, texts: list[str]) -> dict[str, object]:
    """``source.fetch`` on a thread; a fetch still retrying after 30 s is closed (a guard against a hang)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = source.fetch(texts)
        except Exception as err:  # noqa: BLE001 - the test reports whatever escaped
            box["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        source.close()
        thread.join(30)
    assert not thread.is_alive(), "the fetch did not end even after the source was closed"
    return box


@pytest.mark.parametrize("policy", ["fail", "wait", "skip"])
def test_a_response_that_can_never_fit_fails_at_once_under_every_policy(policy, small_limit):
    server, recording = small_limit
    config = SourceConfig(name="code", endpoints=[f"127.0.0.1:{server.port}"], failure=policy, top_k=64,
                          texts_per_request=4, wait_max_s=600)
    refused_before, forwards_before = _counted(server, "RESOURCE_EXHAUSTED"), recording.calls
    with TeacherClient(config.endpoints, timeout=30) as client:
        source = Source(config, client, client.info(), pair=None)
        box = _fetch(source, [TEXT])
    error = box.get("error")
    assert isinstance(error, SourceFailed), box
    message = str(error)
    for words in ("'code'", f"max_message_bytes={LIMIT}", "sources[code].texts_per_request=4",
                  "sources[code].top_k=64", "the teacher's max_message_bytes"):
        assert words in message, message
    assert _counted(server, "RESOURCE_EXHAUSTED") - refused_before == 1  # asked once: never retried
    assert recording.calls == forwards_before  # refused before any forward


def test_the_same_source_with_a_smaller_top_k_fits(small_limit):
    server, _ = small_limit
    config = SourceConfig(name="code", endpoints=[f"127.0.0.1:{server.port}"], failure="fail", top_k=2)
    with TeacherClient(config.endpoints, timeout=30) as client:
        (out,) = Source(config, client, client.info(), pair=None).fetch([TEXT])
    assert out.topk_ids.shape[1] == 2 and len(out.tokens.ids) > 200


def test_a_busy_teacher_stays_a_transient_failure(tiny_model_dirs):
    """RESOURCE_EXHAUSTED without the reason (a full queue) is still "busy, retry": skipped under skip."""
    config = teacher_config(tiny_model_dirs["gpt2"]).model_copy(update={
        "max_queue_tokens": 64, "max_tokens_per_request": 64, "max_tokens_per_text": 64, "max_batch_tokens": 64})
    backend, tokenizer = load_hf(config)
    held = ControlledBackend(backend, hold_after=0)
    with BackgroundServer(config, held, tokenizer) as server, \
            TeacherClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        in_forward = threading.Thread(target=client.score, args=(["the text in the held forward"],))
        queued = threading.Thread(target=client.score, args=(["word " * 50],))  # ~50 tokens wait in the queue
        in_forward.start()
        assert held.held.wait(30)
        queued.start()
        _wait_for(lambda: (server.server.metrics.registry.get_sample_value("livefuse_teacher_queue_tokens") or 0) > 0)
        source = Source(SourceConfig(name="code", endpoints=[f"127.0.0.1:{server.port}"], failure="skip"),
                        client, client.info(), pair=None)
        box = _fetch(source, ["word " * 30])
        busy = _counted(server, "RESOURCE_EXHAUSTED")
        held.stop_holding()
        in_forward.join(30)
        queued.join(30)
        assert not in_forward.is_alive() and not queued.is_alive()
    assert box == {"value": None} and busy == 1, (box, busy)
