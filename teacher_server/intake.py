"""Checks a ScoreRequest against the limits, as early as each check can be made: counts, top_k, format and
characters before tokenizing; tokens per text and per request while tokenizing; the response size before
the forward. A failed check raises RequestError with a message naming the field, the value and the limit."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import grpc

from protos import teacher_pb2 as pb
from protos.errors import RESPONSE_TOO_LARGE, rich_status
from protos.scores import LOGPROB_DTYPES
from teacher_server.config import TeacherConfig
from teacher_server.limits import MAX_REQUEST_ID_CHARS, response_bytes
from teacher_server.tokenizer import Encoded


class RequestError(Exception):
    """A refusal: its status code and message, and, where the code alone is ambiguous, a reason
    (``protos.errors``) with its metadata for the status's trailer."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.reason, self.metadata = reason, dict(metadata or {})

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """The rich status's ``grpc-status-details-bin`` trailer when there is a reason, else none."""
        if self.reason is None:
            return ()
        return tuple(rich_status(self.code, self.message, self.reason, self.metadata).trailing_metadata)


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_request(request: pb.ScoreRequest, info: pb.TeacherInfo, config: TeacherConfig) -> int:
    """Checks count, top_k, format, request_id and empty texts; returns the top_k to use."""
    n, limit = len(request.texts), info.max_texts_per_request
    if n == 0:
        raise invalid("texts: the request has no texts; send 1 to max_texts_per_request "
                      f"({limit}) non-empty texts")
    if n > limit:
        raise invalid(f"texts: {n} texts exceed max_texts_per_request={limit}")
    top_k = request.top_k or config.default_top_k
    if top_k > info.max_top_k:
        raise invalid(f"top_k: {top_k} exceeds max_top_k={info.max_top_k}")
    if request.logprob_format not in LOGPROB_DTYPES:
        raise invalid(f"logprob_format: unknown value {request.logprob_format}; accepted: "
                      + ", ".join(f"{pb.LogprobFormat.Name(v)} ({v})" for v in LOGPROB_DTYPES))
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid(f"request_id: {len(request.request_id)} characters exceed the limit of "
                      f"{MAX_REQUEST_ID_CHARS}")
    for i, text in enumerate(request.texts):
        if not text:
            raise invalid(f"texts[{i}]: empty text; every text must have at least one character")
    return top_k


def cut_to_chars(texts: Sequence[str], truncate: bool, max_chars: int) -> tuple[list[str], list[bool]]:
    """Refuses (or, with ``truncate``, cuts) texts over ``max_chars`` characters, before any tokenizing."""
    out, cut = [], []
    for i, text in enumerate(texts):
        if len(text) > max_chars and not truncate:
            raise invalid(f"texts[{i}]: {len(text)} characters exceed max_chars_per_text={max_chars}; "
                          "shorten the text or set truncate=true")
        out.append(text[:max_chars])
        cut.append(len(text) > max_chars)
    return out, cut


def fit_tokens(encoded: Encoded, index: int, truncate: bool, max_tokens: int) -> tuple[Encoded, bool]:
    """Refuses (or, with ``truncate``, cuts) a text over ``max_tokens``; returns it and whether it was cut."""
    n = len(encoded.ids)
    if n == 0:
        raise invalid(f"texts[{index}]: the text produced no tokens")
    if n <= max_tokens:
        return encoded, False
    if not truncate:
        raise invalid(f"texts[{index}]: {n} tokens exceed max_tokens_per_text={max_tokens}; "
                      "shorten the text or set truncate=true")
    return Encoded(encoded.ids[:max_tokens], encoded.offsets[:max_tokens]), True


def check_request_tokens(total: int, index: int, limit: int) -> None:
    """Called after each text: refuses as soon as the running total is over the limit (the rest of the
    request is never tokenized)."""
    if total > limit:
        raise invalid(f"texts: {total} tokens in texts[0..{index}] already exceed max_tokens_per_request={limit}; "
                      "split the request")


def check_response_size(encoded: Sequence[Encoded], texts: Sequence[str], top_k: int, request: pb.ScoreRequest,
                        info: pb.TeacherInfo) -> None:
    """Refuses, before the forward, a request whose response could exceed the message limit: reason
    RESPONSE_TOO_LARGE, also the first word of the message (ScoreStream's in-band errors have no trailer)."""
    logprob_bytes = LOGPROB_DTYPES[request.logprob_format].itemsize
    gathered = sum(math.prod(g.ids.shape) for g in request.gather)  # shapes checked by gather.check_gather
    size = response_bytes(((len(e.ids), len(t)) for e, t in zip(encoded, texts, strict=True)), top_k,
                          info.vocab_size, logprob_bytes, gathered)
    if size > info.max_message_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{RESPONSE_TOO_LARGE}: the response could take {size} bytes, over "
                           f"max_message_bytes={info.max_message_bytes}; no retry can help: send fewer tokens per "
                           "request, a smaller top_k, fewer gathered ids or LOGPROB_FORMAT_FLOAT16",
                           RESPONSE_TOO_LARGE, {"max_message_bytes": str(info.max_message_bytes),
                                                "response_bytes": str(size)})
