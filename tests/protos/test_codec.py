"""The packed-array codec: exact round trips, little-endian layout, narrow ints, zero-copy decode, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protos import codec
from protos import teacher_pb2 as pb

DTYPES = ["<u1", "<u2", "<u4", "<i4", "<i8", "<f2", "<f4"]


@given(dtype=st.sampled_from(DTYPES), data=st.data())
def test_round_trip_is_exact(dtype, data):
    array = data.draw(hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
    back = codec.decode(codec.encode(array))
    assert back.dtype == np.dtype(dtype) and back.shape == array.shape
    assert back.tobytes() == array.tobytes()  # bit-exact, NaN payloads included


def test_layout_is_little_endian_c_order():
    message = codec.encode(np.array([[1, 2], [3, 258]], dtype=">u2"))  # big-endian input is converted
    assert message.dtype == pb.D_TYPE_UINT16 and list(message.shape) == [2, 2]
    assert message.data == b"\x01\x00\x02\x00\x03\x00\x02\x01"
    fortran = np.asfortranarray(np.arange(6, dtype="<i4").reshape(2, 3))
    assert codec.decode(codec.encode(fortran)).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(("max_value", "dtype"), [(0, "<u1"), (255, "<u1"), (256, "<u2"), (65535, "<u2"),
                                                  (65536, "<u4"), (2**32 - 1, "<u4")])
def test_narrowest_unsigned_type(max_value, dtype):
    assert codec.compact_uint_dtype(max_value) == np.dtype(dtype)
    array = np.array([0, max_value], dtype=np.int64)
    assert codec.decode(codec.encode_uint(array)).tolist() == [0, max_value]


def test_encode_uint_uses_the_given_bound_for_a_stable_dtype():
    assert codec.decode(codec.encode_uint(np.array([1, 2]), max_value=50_000)).dtype == np.dtype("<u2")
    with pytest.raises(codec.CodecError):
        codec.compact_uint_dtype(2**32)


def test_decode_is_a_read_only_view_without_copy():
    message = codec.encode(np.arange(1000, dtype="<f4"))
    view = codec.decode(message)
    assert not view.flags.writeable and not view.flags.owndata


def test_bad_messages_are_refused_with_a_reason():
    with pytest.raises(codec.CodecError, match="unknown Array.dtype"):
        codec.decode(pb.Array(dtype=99, shape=[1], data=b"\x00"))
    with pytest.raises(codec.CodecError, match="needs 8"):
        codec.decode(pb.Array(dtype=pb.D_TYPE_FLOAT32, shape=[2], data=b"\x00" * 7))
    with pytest.raises(codec.CodecError, match="cannot be sent"):
        codec.encode(np.array([1.0], dtype=np.float64))
