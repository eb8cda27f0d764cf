"""The Teacher gRPC service: decode and check the request, tokenize, batch-score, encode. Nothing else."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.scores import LOGPROB_DTYPES, TeacherScores, encode_scores
from teacher_server.batcher import QueueFull, TokenBudgetBatcher
from teacher_server.config import TeacherConfig
from teacher_server.metrics import TeacherMetrics
from teacher_server.tokenizer import Encoded, TeacherTokenizer

log = logging.getLogger("livefuse.teacher.servicer")
VOCAB_CHUNK = 4096


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


class TeacherServicer(pb_grpc.TeacherServicer):
    """Answers UNAVAILABLE until ``attach`` hands it the loaded model (the health service says the same)."""

    def __init__(self, config: TeacherConfig, metrics: TeacherMetrics) -> None:
        self.config, self.metrics = config, metrics
        self.ready = False
        self._tokenize_pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="tokenize")

    def attach(self, info: pb.TeacherInfo, tokenizer: TeacherTokenizer, batcher: TokenBudgetBatcher) -> None:
        self.info, self.tokenizer, self.batcher = info, tokenizer, batcher
        self.vocab = tokenizer.vocab(info.vocab_size)
        self.ready = True

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> None:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.TeacherInfo:
        await self._require_ready(context)
        self.metrics.requests.labels("GetInfo", "OK").inc()
        return self.info

    async def GetVocab(self, request: pb.GetVocabRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.VocabChunk]:
        await self._require_ready(context)
        size = request.chunk_size or VOCAB_CHUNK
        for start in range(0, len(self.vocab), size):
            yield pb.VocabChunk(start_id=start, tokens=self.vocab[start:start + size])
        self.metrics.requests.labels("GetVocab", "OK").inc()

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        await self._require_ready(context)
        response = await self._score_or_error(request, "Score")
        if response.HasField("error"):
            await context.abort(_CODES[response.error.code], response.error.message)
        return response

    async def ScoreStream(self, request_iterator: AsyncIterator[pb.ScoreRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreResponse]:
        await self._require_ready(context)
        done: asyncio.Queue[pb.ScoreResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(request: pb.ScoreRequest) -> None:
            done.put_nowait(await self._score_or_error(request, "ScoreStream"))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*tasks)
            finally:
                done.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await done.get()) is not None:
                yield response
        finally:
            for task in (reader, *tasks):
                task.cancel()

    async def _score_or_error(self, request: pb.ScoreRequest, method: str) -> pb.ScoreResponse:
        """Scores a request; a bad or refused request comes back with ``error`` set, never as an exception."""
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await self._score(request)
        except RequestError as err:
            code = err.code
            return pb.ScoreResponse(request_id=request.request_id,
                                    error=pb.ErrorStatus(code=err.code.value[0], message=err.message))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("scoring failed")
            return pb.ScoreResponse(request_id=request.request_id, error=pb.ErrorStatus(
                code=code.value[0], message=f"internal error while scoring: {type(exc).__name__}: {exc}"))
        finally:
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - t0)

    async def _score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        top_k = self._check_request(request)
        texts = list(request.texts)
        encoded = await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self.tokenizer.encode, texts)
        encoded, truncated = self._check_lengths(encoded, request.truncate)
        try:
            outputs = await self.batcher.submit([e.ids for e in encoded], top_k)
        except QueueFull as full:
            self.metrics.rejected.inc()
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy, retry later: {full}") from None
        self.metrics.tokens.inc(sum(len(e.ids) for e in encoded))
        self.metrics.texts.inc(len(encoded))
        results = [
            encode_scores(TeacherScores(e.ids, e.offsets, o.topk_ids, o.topk_logprobs, o.next_logprobs, t),
                          self.info.vocab_size, len(text), request.logprob_format)
            for e, o, t, text in zip(encoded, outputs, truncated, texts, strict=True)
        ]
        return pb.ScoreResponse(request_id=request.request_id, results=results,
                                tokenizer_fingerprint=self.info.tokenizer_fingerprint)

    def _check_request(self, request: pb.ScoreRequest) -> int:
        """Checks count, top_k, format and empty texts; returns the top_k to use."""
        n, limit = len(request.texts), self.info.max_texts_per_request
        if n == 0:
            raise _invalid("texts: the request has no texts; send 1 to max_texts_per_request "
                           f"({limit}) non-empty texts")
        if n > limit:
            raise _invalid(f"texts: {n} texts exceed max_texts_per_request={limit}")
        top_k = request.top_k or self.config.default_top_k
        if top_k > self.info.max_top_k:
            raise _invalid(f"top_k: {top_k} exceeds max_top_k={self.info.max_top_k}")
        if request.logprob_format not in LOGPROB_DTYPES:
            raise _invalid(f"logprob_format: unknown value {request.logprob_format}; accepted: "
                           + ", ".join(f"{pb.LogprobFormat.Name(v)} ({v})" for v in LOGPROB_DTYPES))
        for i, text in enumerate(request.texts):
            if not text:
                raise _invalid(f"texts[{i}]: empty text; every text must have at least one character")
        return top_k

    def _check_lengths(self, encoded: list[Encoded], truncate: bool) -> tuple[list[Encoded], list[bool]]:
        limit, out, truncated = self.info.max_tokens_per_text, [], []
        for i, e in enumerate(encoded):
            n = len(e.ids)
            if n == 0:
                raise _invalid(f"texts[{i}]: the text produced no tokens")
            if n > limit and not truncate:
                raise _invalid(f"texts[{i}]: {n} tokens exceed max_tokens_per_text={limit}; "
                               "shorten the text or set truncate=true")
            out.append(Encoded(e.ids[:limit], e.offsets[:limit]) if n > limit else e)
            truncated.append(n > limit)
        total = sum(len(e.ids) for e in out)
        if total > self.info.max_tokens_per_request:
            raise _invalid(f"texts: {total} tokens in total exceed "
                           f"max_tokens_per_request={self.info.max_tokens_per_request}; split the request")
        return out, truncated

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False)


_CODES = {c.value[0]: c for c in grpc.StatusCode}
