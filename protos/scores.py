"""Conversion between one scored text (numpy arrays) and its ``ScoredText`` message."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protos import codec
from protos import teacher_pb2 as pb

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
    )
