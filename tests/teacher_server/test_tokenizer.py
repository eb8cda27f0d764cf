"""How requests are cut into tokenizer jobs: contiguous chunks that cover every text once, each within the
character budget unless it is a single longer text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from teacher_server.tokenizer import chunks


@given(lengths=st.lists(st.integers(1, 300), max_size=30), budget=st.integers(1, 500))
def test_chunks_cover_the_texts_in_order_within_the_budget(lengths, budget):
    texts = ["x" * n for n in lengths]
    ranges = chunks(texts, budget)
    assert [i for start, end in ranges for i in range(start, end)] == list(range(len(texts)))
    for start, end in ranges:
        assert end > start
        assert end - start == 1 or sum(lengths[start:end]) <= budget
    for (start, end), _ in zip(ranges, ranges[1:], strict=False):  # a chunk ends only when the next text won't fit
        assert sum(lengths[start:end]) + lengths[end] > budget
