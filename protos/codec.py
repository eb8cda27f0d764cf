"""Packed-array codec shared by the teacher server and its clients.

Arrays travel as little-endian, C-ordered bytes with an explicit dtype and shape. Decoding is
zero-copy: the returned numpy array is a read-only view on the message's bytes.
"""

from __future__ import annotations

import numpy as np

from protos import teacher_pb2 as pb

_TO_WIRE: dict[np.dtype, int] = {
    np.dtype("<u1"): pb.D_TYPE_UINT8,
    np.dtype("<u2"): pb.D_TYPE_UINT16,
    np.dtype("<u4"): pb.D_TYPE_UINT32,
    np.dtype("<i4"): pb.D_TYPE_INT32,
    np.dtype("<i8"): pb.D_TYPE_INT64,
    np.dtype("<f2"): pb.D_TYPE_FLOAT16,
    np.dtype("<f4"): pb.D_TYPE_FLOAT32,
}
_FROM_WIRE: dict[int, np.dtype] = {v: k for k, v in _TO_WIRE.items()}


class CodecError(ValueError):
    """A malformed Array message (unknown dtype, or data length that does not match the shape)."""


def encode(array: np.ndarray) -> pb.Array:
    """Packs ``array`` as-is (its dtype must be one the wire format knows)."""
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _TO_WIRE:
        raise CodecError(f"dtype {array.dtype} cannot be sent; accepted: {sorted(str(d) for d in _TO_WIRE)}")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return pb.Array(dtype=_TO_WIRE[dtype], shape=list(array.shape), data=data)


def compact_uint_dtype(max_value: int) -> np.dtype:
    """Narrowest unsigned dtype that holds every value in ``[0, max_value]``."""
    for dtype in (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4")):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise CodecError(f"value {max_value} does not fit in uint32")


def encode_uint(array: np.ndarray, max_value: int | None = None) -> pb.Array:
    """Packs a non-negative integer array in the narrowest unsigned type for ``max_value``.

    Pass ``max_value`` (e.g. the vocabulary size - 1) so that every message of a stream uses the same
    dtype; without it the array's own maximum decides.
    """
    if max_value is None:
        max_value = int(array.max()) if array.size else 0
    return encode(array.astype(compact_uint_dtype(max_value), copy=False))


def decode(message: pb.Array) -> np.ndarray:
    """Zero-copy, read-only view of ``message`` as a numpy array."""
    dtype = _FROM_WIRE.get(message.dtype)
    if dtype is None:
        raise CodecError(f"unknown Array.dtype {message.dtype}")
    shape = tuple(message.shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(message.data) != count * dtype.itemsize:
        raise CodecError(
            f"Array data has {len(message.data)} bytes; shape {shape} of {dtype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(message.data, dtype=dtype, count=count).reshape(shape)
