"""ScoreRequest.gather: log-probs at ids of the client's choosing, at positions it names by character.

On-policy distillation (reverse KL, GKD's JSD) needs each teacher's log-probs at the tokens the *student*
favours, which a top-k answer cannot give. The client names each position by a character offset ``e`` of
the text, not by a token index (it does not know this teacher's tokens): the position gathered is the last
token that ends at ``e``, which has read exactly ``text[:e]``, so the same ``e`` picks comparable positions
in teachers with different tokenizers. ``check_gather`` checks the request before tokenizing;
``token_positions`` and ``locate`` turn the ends into the token positions the backend gathers at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
import numpy as np

from protos import codec
from protos import teacher_pb2 as pb
from protos.scores import GATHER_PADDING
from teacher_server.backends.base import Gather
from teacher_server.intake import RequestError, invalid

Wanted = tuple[np.ndarray, np.ndarray]
"""One text's checked GatherSpec: ends (m,) int64 and ids (m, c) int64 with -1 for padding."""


def check_gather(request: pb.ScoreRequest, info: pb.TeacherInfo) -> list[Wanted] | None:
    """The request's gathers, checked against this teacher and its limits; None when it asks none.

    FAILED_PRECONDITION when this teacher cannot gather; INVALID_ARGUMENT naming the field otherwise."""
    if not request.gather:
        return None
    if info.max_gather_ids == 0:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"gather: this teacher (backend {info.backend}) cannot gather log-probs at chosen ids "
                           "(TeacherInfo.max_gather_ids = 0); send the request without gather, or to a teacher "
                           "whose max_gather_ids is above 0 (backend hf)")
    if len(request.gather) != len(request.texts):
        raise invalid(f"gather: {len(request.gather)} GatherSpecs for {len(request.texts)} texts; send one per "
                      "text (ends of shape (0,) for a text that needs none), or none")
    total = sum(_checked_size(i, spec) for i, spec in enumerate(request.gather))
    if total > info.max_gather_ids:
        raise invalid(f"gather: {total} ids (m x c summed over the texts) exceed max_gather_ids="
                      f"{info.max_gather_ids}; split the request or gather fewer ids")
    return [_decoded(i, spec, len(text), info.vocab_size)
            for i, (spec, text) in enumerate(zip(request.gather, request.texts, strict=True))]


def _checked_size(index: int, spec: pb.GatherSpec) -> int:
    """m * c of one GatherSpec, from the shapes alone (before any data is read)."""
    for name, array, dims in (("ends", spec.ends, 1), ("ids", spec.ids, 2)):
        if array.dtype != pb.D_TYPE_UINT32:
            raise invalid(f"gather[{index}].{name}: dtype {pb.DType.Name(array.dtype)}; send D_TYPE_UINT32")
        if len(array.shape) != dims:
            raise invalid(f"gather[{index}].{name}: shape {list(array.shape)} has {len(array.shape)} dimensions; "
                          f"expected {dims} ({'(m,)' if dims == 1 else '(m, c)'})")
    if spec.ids.shape[0] != spec.ends.shape[0]:
        raise invalid(f"gather[{index}].ids: shape {list(spec.ids.shape)} has {spec.ids.shape[0]} rows for "
                      f"{spec.ends.shape[0]} ends; expected (m, c) with m = len(ends)")
    return math.prod(spec.ids.shape)


def _decoded(index: int, spec: pb.GatherSpec, num_chars: int, vocab_size: int) -> Wanted:
    ends, ids = (_array(spec.ends, f"gather[{index}].ends"), _array(spec.ids, f"gather[{index}].ids"))
    if np.any(step := np.diff(ends) <= 0):
        j = int(np.argmax(step))
        raise invalid(f"gather[{index}].ends: not strictly increasing: ends[{j + 1}]={ends[j + 1]} follows "
                      f"ends[{j}]={ends[j]}")
    if ends.size and ends[-1] > num_chars:
        j = int(np.argmax(ends > num_chars))
        raise invalid(f"gather[{index}].ends[{j}]={ends[j]} is past the end of texts[{index}] ({num_chars} "
                      "characters); ends count code points, 0 .. len(text)")
    if np.any(bad := (ids >= vocab_size) & (ids != GATHER_PADDING)):
        r, c = (int(x) for x in np.argwhere(bad)[0])
        raise invalid(f"gather[{index}].ids[{r}, {c}]={ids[r, c]} is not below vocab_size={vocab_size}; pad "
                      f"with {GATHER_PADDING}")
    return ends, np.where(ids == GATHER_PADDING, -1, ids)


def _array(message: pb.Array, name: str) -> np.ndarray:
    try:
        return codec.decode(message).astype(np.int64)
    except codec.CodecError as err:
        raise invalid(f"{name}: {err}") from None


def token_positions(token_ends: np.ndarray, ends: np.ndarray, kept: int) -> np.ndarray:
    """(m,) for each character end e, the last token j with ``token_ends[j] == e`` (byte fragments of one
    character share its end; the last has read all of it), or -1 where no token ends at e or that token is
    not among the ``kept`` first (a truncation dropped it, so the kept tokens have not read text[:e])."""
    order = np.argsort(token_ends, kind="stable")  # equal ends keep their order: the last is the largest j
    ordered = token_ends[order]
    at = np.searchsorted(ordered, ends, side="right") - 1
    found = (at >= 0) & (ordered[np.maximum(at, 0)] == ends)
    positions = np.where(found, order[np.maximum(at, 0)], -1)
    return np.where(positions < kept, positions, -1)


def locate(wanted: Sequence[Wanted], token_ends: Sequence[np.ndarray], kept: Sequence[int]) -> list[Gather]:
    """The backend's Gather per text: ``token_ends`` of each text's tokens before any token truncation,
    ``kept`` tokens of it scored."""
    return [Gather(token_positions(t, ends, n), ids)
            for (ends, ids), t, n in zip(wanted, token_ends, kept, strict=True)]
