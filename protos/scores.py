"""Conversion between one scored text (numpy arrays) and its ``ScoredText`` message, and a text's
``GatherSpec`` (where and which ids to gather log-probs at) from numpy arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protos import codec
from protos import teacher_pb2 as pb

GATHER_PADDING = 0xFFFFFFFF  # a GatherSpec id that asks nothing (its log-prob is -inf)

LOGPROB_DTYPES = {
    pb.LOGPROB_FORMAT_UNSPECIFIED: np.dtype("<f2"),
    pb.LOGPROB_FORMAT_FLOAT16: np.dtype("<f2"),
    pb.LOGPROB_FORMAT_FLOAT32: np.dtype("<f4"),
}


@dataclass(frozen=True)
class TeacherScores:
    """A teacher's view of one text of n tokens; position j predicts token j+1."""

    input_ids: np.ndarray      # (n,)
    offsets: np.ndarray        # (n, 2) [start, end) code-point offsets into the text
    topk_ids: np.ndarray       # (n, k)
    topk_logprobs: np.ndarray  # (n, k)
    next_logprobs: np.ndarray  # (n-1,)
    truncated: bool = False
    gathered_logprobs: np.ndarray | None = None  # (m, c) at the request's GatherSpec; None: not asked


def encode_scores(s: TeacherScores, vocab_size: int, num_chars: int, logprob_format: int) -> pb.ScoredText:
    """Packs ids and offsets in the narrowest unsigned type for the vocabulary / text length."""
    lp_dtype = LOGPROB_DTYPES[logprob_format]
    return pb.ScoredText(
        input_ids=codec.encode_uint(s.input_ids, vocab_size - 1),
        offsets=codec.encode_uint(s.offsets, num_chars),
        topk_ids=codec.encode_uint(s.topk_ids, vocab_size - 1),
        topk_logprobs=codec.encode(s.topk_logprobs.astype(lp_dtype, copy=False)),
        next_logprobs=codec.encode(s.next_logprobs.astype(lp_dtype, copy=False)),
        truncated=s.truncated,
        gathered_logprobs=None if s.gathered_logprobs is None
        else codec.encode(s.gathered_logprobs.astype(lp_dtype, copy=False)),
    )


def decode_scores(m: pb.ScoredText) -> TeacherScores:
    """Zero-copy views of the message's arrays (read-only)."""
    return TeacherScores(
        input_ids=codec.decode(m.input_ids),
        offsets=codec.decode(m.offsets),
        topk_ids=codec.decode(m.topk_ids),
        topk_logprobs=codec.decode(m.topk_logprobs),
        next_logprobs=codec.decode(m.next_logprobs),
        truncated=m.truncated,
        gathered_logprobs=codec.decode(m.gathered_logprobs) if m.HasField("gathered_logprobs") else None,
    )


def encode_gather(ends: np.ndarray | Sequence[int], ids: np.ndarray | Sequence[Sequence[int]]) -> pb.GatherSpec:
    """One text's GatherSpec: ``ends (m,)`` character offsets, ``ids (m, c)`` teacher ids with any negative
    id (or GATHER_PADDING) as padding. Both go as uint32 (see teacher.proto)."""
    ends, ids = np.asarray(ends, dtype=np.int64), np.asarray(ids, dtype=np.int64)
    if ids.size == 0 and ids.ndim < 2:
        ids = ids.reshape(len(ends), 0)  # no ends: an empty list of rows
    if ids.ndim != 2 or ends.ndim != 1 or ids.shape[0] != ends.shape[0]:
        raise ValueError(f"gather: ends must be (m,) and ids (m, c); got {ends.shape} and {ids.shape}")
    if (ends.size and not 0 <= ends.min() <= ends.max() <= GATHER_PADDING) or (ids.size and ids.max() > GATHER_PADDING):
        raise ValueError("gather: ends and ids must fit uint32 (ends >= 0; a negative id is padding)")
    ids = np.where(ids < 0, GATHER_PADDING, ids)
    return pb.GatherSpec(ends=codec.encode(ends.astype("<u4")), ids=codec.encode(ids.astype("<u4")))
