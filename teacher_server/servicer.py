"""The Teacher gRPC service: check the request, tokenize, batch-score, encode. Nothing else.

Requests reach it already authenticated and parsed (``teacher_server.gate``); the limits are checked in
``teacher_server.intake`` as early as each can be; ScoreStream's flow control is ``teacher_server.streaming``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import grpc
import numpy as np

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.scores import TeacherScores, encode_scores
from teacher_server.backends.base import BackendDead, Gather, ScoreOutput
from teacher_server.batcher import Overloaded, QueueFull, TokenBudgetBatcher
from teacher_server.config import TeacherConfig
from teacher_server.gather import check_gather, locate
from teacher_server.intake import (
    RequestError,
    check_request,
    check_request_tokens,
    check_response_size,
    cut_to_chars,
    fit_tokens,
)
from teacher_server.metrics import TeacherMetrics
from teacher_server.streaming import StreamBroken, serve_stream
from teacher_server.tokenizer import Encoded, TeacherTokenizer, TokenizerLanes

log = logging.getLogger("livefuse.teacher.servicer")
TimeLeft = Callable[[], float | None]
"""The caller's seconds left (``context.time_remaining``), read when the early refusal compares it: after
tokenizing, which can take seconds for a large request."""
VOCAB_CHUNK = 4096
VOCAB_FRAMING_BYTES = 1024  # VocabChunk tags and start_id, with room to spare


def vocab_chunks(sizes: Sequence[int], max_tokens: int, max_bytes: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` ranges of at most ``max_tokens`` tokens and ``max_bytes`` encoded bytes each
    (``sizes``: each token's bytes on the wire; a chunk holds at least one token)."""
    start = 0
    while start < len(sizes):
        end, used = start, 0
        while end < len(sizes) and end - start < max_tokens and (end == start or used + sizes[end] <= max_bytes):
            used += sizes[end]
            end += 1
        yield start, end
        start = end


class TeacherServicer(pb_grpc.TeacherServicer):
    """Answers UNAVAILABLE until ``attach`` hands it the loaded model (the health service says the same)."""

    def __init__(self, config: TeacherConfig, metrics: TeacherMetrics) -> None:
        self.config, self.metrics = config, metrics
        self.ready = False

    def attach(self, info: pb.TeacherInfo, tokenizer: TeacherTokenizer, batcher: TokenBudgetBatcher) -> None:
        self.info, self.tokenizer, self.batcher = info, tokenizer, batcher
        self.lanes = TokenizerLanes(tokenizer, self.config.tokenizer_threads)
        self.vocab = tokenizer.vocab(info.vocab_size)
        self._vocab_sizes = [len(token.encode()) + 6 for token in self.vocab]  # tag + length + UTF-8
        self.ready = True

    async def _require_ready(self, context: grpc.aio.ServicerContext, method: str) -> None:
        if not self.ready:
            self.metrics.requests.labels(method, "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.TeacherInfo:
        await self._require_ready(context, "GetInfo")
        self.metrics.requests.labels("GetInfo", "OK").inc()
        return self.info

    async def GetVocab(self, request: pb.GetVocabRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.VocabChunk]:
        await self._require_ready(context, "GetVocab")
        max_bytes = max(self.info.max_message_bytes - VOCAB_FRAMING_BYTES, 1)
        for start, end in vocab_chunks(self._vocab_sizes, request.chunk_size or VOCAB_CHUNK, max_bytes):
            yield pb.VocabChunk(start_id=start, tokens=self.vocab[start:end])
        self.metrics.requests.labels("GetVocab", "OK").inc()

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        await self._require_ready(context, "Score")
        response, error = await self._score_or_error(request, "Score", context.time_remaining)
        if error is not None:
            await context.abort(error.code, error.message, error.trailing_metadata())
        return response

    async def ScoreStream(self, request_iterator: AsyncIterator[pb.ScoreRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreResponse]:
        await self._require_ready(context, "ScoreStream")

        async def score(request: pb.ScoreRequest) -> pb.ScoreResponse:
            response, _ = await self._score_or_error(request, "ScoreStream", context.time_remaining)
            return response

        try:
            async for response in serve_stream(request_iterator, score, self.config.stream_max_pending,
                                               self.config.stream_max_unsent_bytes):
                yield response
        except StreamBroken as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    async def _score_or_error(self, request: pb.ScoreRequest, method: str, time_left: TimeLeft
                              ) -> tuple[pb.ScoreResponse, RequestError | None]:
        """Scores a request; a bad or refused request comes back as a response with ``error`` set and the
        RequestError (for Score's status and its trailer), never as an exception."""
        t0, error = time.perf_counter(), None
        try:
            return await self._score(request, time_left), None
        except RequestError as err:
            error = err
        except asyncio.CancelledError:
            error = RequestError(grpc.StatusCode.CANCELLED, "cancelled")
            raise
        except BackendDead as dead:  # UNAVAILABLE: clients retry on another replica while this one restarts
            error = RequestError(grpc.StatusCode.UNAVAILABLE,
                                 f"this teacher's inference engine died and it is shutting down: {dead}")
        except Exception as exc:
            log.exception("scoring failed")
            error = RequestError(grpc.StatusCode.INTERNAL,
                                 f"internal error while scoring: {type(exc).__name__}: {exc}")
        finally:
            code = grpc.StatusCode.OK if error is None else error.code
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - t0)
        return self._error(request, error), error

    def _error(self, request: pb.ScoreRequest, error: RequestError) -> pb.ScoreResponse:
        """An error response; like every response it names the tokenizer (clients check it on each one)."""
        return pb.ScoreResponse(request_id=request.request_id,
                                error=pb.ErrorStatus(code=error.code.value[0], message=error.message),
                                tokenizer_fingerprint=self.info.tokenizer_fingerprint)

    async def _score(self, request: pb.ScoreRequest, time_left: TimeLeft) -> pb.ScoreResponse:
        top_k = check_request(request, self.info, self.config)
        wanted = check_gather(request, self.info)
        texts, cut = cut_to_chars(request.texts, request.truncate, self.config.max_chars_per_text)
        encoded, truncated, token_ends = await self._tokenize(texts, request.truncate)
        check_response_size(encoded, texts, top_k, request, self.info)
        gather = None if wanted is None else locate(wanted, token_ends, [len(e.ids) for e in encoded])
        outputs = await self._submit([e.ids for e in encoded], top_k, time_left, gather)
        self.metrics.tokens.inc(sum(len(e.ids) for e in encoded))
        self.metrics.texts.inc(len(encoded))
        results = [
            encode_scores(TeacherScores(e.ids, e.offsets, o.topk_ids, o.topk_logprobs, o.next_logprobs, c or t,
                                        o.gathered_logprobs),
                          self.info.vocab_size, len(text), request.logprob_format)
            for e, o, c, t, text in zip(encoded, outputs, cut, truncated, texts, strict=True)
        ]
        return pb.ScoreResponse(request_id=request.request_id, results=results,
                                tokenizer_fingerprint=self.info.tokenizer_fingerprint)

    async def _tokenize(self, texts: list[str], truncate: bool
                        ) -> tuple[list[Encoded], list[bool], list[np.ndarray]]:
        """Tokenizes chunk by chunk, checking each text's tokens and the running total as they come. Also
        returns each text's token ends before any token truncation (where gather looks for its ends)."""
        encoded: list[Encoded] = []
        truncated: list[bool] = []
        token_ends: list[np.ndarray] = []
        total = 0
        async for start, part in self.lanes.encode(texts):
            for index, e in enumerate(part, start):
                token_ends.append(e.offsets[:, 1])
                e, cut = fit_tokens(e, index, truncate, self.info.max_tokens_per_text)
                total += len(e.ids)
                check_request_tokens(total, index, self.info.max_tokens_per_request)
                encoded.append(e)
                truncated.append(cut)
        return encoded, truncated, token_ends

    async def _submit(self, seqs: list[np.ndarray], top_k: int, time_left: TimeLeft,
                      gather: list[Gather] | None = None) -> list[ScoreOutput]:
        within_s = time_left() if self.config.early_refusal else None  # now: submit compares it before any await
        try:
            return await self.batcher.submit(seqs, top_k, within_s, gather=gather)
        except QueueFull as full:
            self.metrics.rejected.inc()
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy, retry later: {full}") from None
        except Overloaded as late:
            self.metrics.overloaded.inc()
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"overloaded, retry on another replica: {late}") from None

    def close(self) -> None:
        if self.ready:
            self.lanes.close()
