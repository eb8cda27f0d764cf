"""The servicer's request path without a model or a network: a fake clock, a tokenizer double whose
tokenizing "takes" fake time, and the real batcher with a known estimate of the work queued ahead."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from protos import teacher_pb2 as pb
from teacher_server.backends.base import ScoreOutput
from teacher_server.batcher import HEADROOM, TokenBudgetBatcher
from teacher_server.config import load_config
from teacher_server.metrics import TeacherMetrics
from teacher_server.servicer import TeacherServicer
from teacher_server.tokenizer import Encoded


class Clock:
    def __init__(self) -> None:
        self.now = 0.0


class SlowTokenizer:
    """One token per character; each call advances the fake clock by ``seconds``."""

    fingerprint = "sha256:fake"

    def __init__(self, clock: Clock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def encode(self, texts: list[str]) -> list[Encoded]:
        self.clock.now += self.seconds
        return [Encoded(np.arange(len(t), dtype=np.int64), np.stack([np.arange(len(t)), np.arange(1, len(t) + 1)], 1))
                for t in texts]

    def vocab(self, vocab_size: int) -> list[str]:
        return [""] * vocab_size


class Aborted(Exception):
    pass


class Context:
    """The part of grpc.aio.ServicerContext the servicer uses, on the fake clock."""

    def __init__(self, clock: Clock, deadline: float) -> None:
        self.clock, self.deadline = clock, deadline

    def time_remaining(self) -> float:
        return self.deadline - self.clock.now

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        raise Aborted(code, details)


def _score(batch, top_k):
    return [ScoreOutput(np.zeros((len(s), top_k), np.int64), np.zeros((len(s), top_k), np.float32),
                        np.zeros(len(s) - 1, np.float32)) for s in batch]


def _servicer(clock: Clock, tokenizing_s: float, queued_work_s: float) -> TeacherServicer:
    config = load_config(overrides={"model": "unused", "device": "cpu", "metrics_port": None})
    info = pb.TeacherInfo(tokenizer_fingerprint="sha256:fake", vocab_size=64, max_top_k=config.max_top_k,
                          max_texts_per_request=config.max_texts_per_request,
                          max_tokens_per_text=config.max_tokens_per_text,
                          max_tokens_per_request=config.max_tokens_per_request,
                          max_message_bytes=config.max_message_bytes)
    batcher = TokenBudgetBatcher(_score, max_batch_tokens=config.max_batch_tokens,
                                 max_batch_texts=config.max_batch_texts, max_queue_tokens=config.max_queue_tokens)
    batcher.estimated_wait = lambda tokens: queued_work_s  # what the measured forwards would say
    batcher.start()
    servicer = TeacherServicer(config, TeacherMetrics())
    servicer.attach(info, SlowTokenizer(clock, tokenizing_s), batcher)
    return servicer


async def _call(servicer: TeacherServicer, method: str, request: pb.ScoreRequest, context: Context
                ) -> tuple[int, str]:
    """(status code number, message) of the answer: Score's abort, or ScoreStream's in-band error."""
    if method == "Score":
        try:
            response = await servicer.Score(request, context)
        except Aborted as err:
            return err.args[0].value[0], err.args[1]
        return 0, ""

    async def one():
        yield request

    (response,) = [r async for r in servicer.ScoreStream(one(), context)]
    return response.error.code, response.error.message


@pytest.mark.parametrize("method", ["Score", "ScoreStream"])
def test_the_early_refusal_compares_the_time_left_after_tokenizing(method):
    """Defect: the deadline's time left was read before tokenizing and compared after it, so a request that
    spent 6 of its 10 s tokenizing was compared as if it still had 10 s (and queued, to miss its deadline)."""
    clock = Clock()
    queued_work_s = 5.0  # fits 80% of the 10 s the request came with, not 80% of the 4 s left after tokenizing
    assert HEADROOM * 4.0 < queued_work_s < HEADROOM * 10.0

    async def main() -> tuple[int, str]:
        servicer = _servicer(clock, tokenizing_s=6.0, queued_work_s=queued_work_s)
        try:
            request = pb.ScoreRequest(texts=["a long text"], top_k=2)
            return await asyncio.wait_for(_call(servicer, method, request, Context(clock, deadline=10.0)), 60)
        finally:
            servicer.close()
            await servicer.batcher.stop()

    code, details = asyncio.run(main())
    assert code == grpc.StatusCode.UNAVAILABLE.value[0] and "overloaded" in details, (code, details)
    assert "its deadline leaves 4.0 s" in details, details


def test_a_request_whose_time_left_after_tokenizing_fits_is_scored():
    clock = Clock()

    async def main() -> pb.ScoreResponse:
        servicer = _servicer(clock, tokenizing_s=1.0, queued_work_s=5.0)  # 5 s <= 80% of the 9 s left
        try:
            return await asyncio.wait_for(servicer.Score(pb.ScoreRequest(texts=["a text"], top_k=2),
                                                         Context(clock, deadline=10.0)), 60)
        finally:
            servicer.close()
            await servicer.batcher.stop()

    response = asyncio.run(main())
    assert len(response.results) == 1 and not response.HasField("error")
