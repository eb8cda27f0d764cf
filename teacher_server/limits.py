"""How large a Score response can get, so that no response fails at the transport after the work was done.

Checked twice: at start for the configured limits (the worst case: uint32 ids and offsets, fp32 log-probs,
every token of ``max_tokens_per_request`` at ``max_top_k``, ``max_gather_ids`` gathered log-probs), and per
request before any forward, with the real token counts, top_k, gathered ids, log-prob format and vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

CHARS_PER_TOKEN = 16
"""Default ``max_chars_per_text`` per token of ``max_tokens_per_text``: the longest tokens of common
vocabularies are runs of 16 spaces, so a text that fits the token limit is not refused for its characters."""

MAX_REQUEST_ID_CHARS = 1024
TEXT_FRAMING_BYTES = 160      # protobuf tags, lengths and shapes of one ScoredText (at most ~155 with gathered)
RESPONSE_FRAMING_BYTES = 8192  # request_id (<= MAX_REQUEST_ID_CHARS), tokenizer fingerprint, framing


def uint_bytes(max_value: int) -> int:
    """Bytes per value of the narrowest unsigned type the codec picks for ``[0, max_value]``."""
    return 1 if max_value <= 0xFF else 2 if max_value <= 0xFFFF else 4


def text_bytes(tokens: int, chars: int, top_k: int, vocab_size: int, logprob_bytes: int) -> int:
    """Upper bound of one ScoredText: ids, offsets, top-k ids and log-probs, next log-probs, framing."""
    ids, offsets = uint_bytes(vocab_size - 1), uint_bytes(chars)
    per_token = ids + 2 * offsets + top_k * (ids + logprob_bytes)
    return tokens * per_token + max(tokens - 1, 0) * logprob_bytes + TEXT_FRAMING_BYTES


def response_bytes(texts: Iterable[tuple[int, int]], top_k: int, vocab_size: int, logprob_bytes: int,
                   gathered_ids: int = 0) -> int:
    """Upper bound of a ScoreResponse for ``(tokens, chars)`` per text and ``gathered_ids`` log-probs gathered
    in all (the sum of m * c over the request's GatherSpecs; their framing is in TEXT_FRAMING_BYTES)."""
    return RESPONSE_FRAMING_BYTES + gathered_ids * logprob_bytes + sum(
        text_bytes(tokens, chars, top_k, vocab_size, logprob_bytes) for tokens, chars in texts)


def worst_case_response_bytes(max_tokens_per_request: int, max_top_k: int, max_texts_per_request: int,
                              max_gather_ids: int = 0) -> int:
    """The largest response any request within the limits can get: any vocabulary, any text length, fp32."""
    per_token = 4 + 2 * 4 + max_top_k * (4 + 4) + 4
    return (max_tokens_per_request * per_token + 4 * max_gather_ids + max_texts_per_request * TEXT_FRAMING_BYTES
            + RESPONSE_FRAMING_BYTES)
