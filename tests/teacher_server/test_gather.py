"""ScoreRequest.gather through real teacher servers on loopback: the log-probs at the client's ids equal a
direct forward of the same model (full log-softmax in torch) at the position that has read exactly text[:e],
for a SentencePiece tokenizer with byte fallback (llama-spm) and a byte-level BPE (GPT-2); byte fragments,
ends with no token boundary, padding and truncation give what teacher.proto says; every new limit holds at
the limit and refuses one past it; bad input is named; a backend that cannot gather says so."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from protos import codec
from protos import teacher_pb2 as pb
from protos.scores import GATHER_PADDING, encode_gather
from student_trainer.trainer.client import ResponseTooLarge, TeacherClient
from teacher_server.background import BackgroundServer
from teacher_server.config import TeacherConfig
from teacher_server.limits import response_bytes

from .conftest import make_config

pytestmark = pytest.mark.integration

F32 = pb.LOGPROB_FORMAT_FLOAT32
# Accents (GPT-2 splits Ü into two byte-level pieces), an emoji (four byte-fallback tokens in llama-spm; a
# piece that spans the space and the emoji's first bytes, then its last byte, in GPT-2), runs of spaces, a
# tab and a newline.
TEXT = "Ünï 😀 é\tx  y\n quick brown fox, déjà vu 🤖!"
GATHERERS = ["llama", "gpt2"]  # SentencePiece with byte fallback; byte-level BPE


def last_token_ending_at(offsets: np.ndarray, end: int) -> int:
    """The reference rule, spelled out: the last token whose span ends at ``end``, or -1."""
    found = [j for j, (_, stop) in enumerate(offsets.tolist()) if stop == end]
    return found[-1] if found else -1


def direct_logprobs(model_dir, ids: np.ndarray) -> np.ndarray:
    """(n, V) fp32 log-softmax of a plain transformers forward over ``ids`` (no BOS)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64))[None]).logits[0]
    return torch.log_softmax(logits.float(), -1).numpy()


def expected(logp: np.ndarray, offsets: np.ndarray, ends, ids: np.ndarray, kept: int | None = None) -> np.ndarray:
    out = np.full(ids.shape, -np.inf, np.float32)
    for i, end in enumerate(ends):
        j = last_token_ending_at(offsets, end)
        if j >= 0 and (kept is None or j < kept):
            out[i] = np.where(ids[i] >= 0, logp[j, np.maximum(ids[i], 0)], -np.inf)
    return out


def random_ids(rng: np.random.Generator, rows: int, c: int, vocab_size: int) -> np.ndarray:
    ids = rng.integers(0, vocab_size, (rows, c))
    ids[::3, -1] = -1          # padding
    ids[1, 0] = vocab_size - 1  # the largest id (a padded output row past the tokenizer)
    return ids


@pytest.fixture(scope="module")
def gatherers(tiny_model_dirs, loaded):
    servers = {name: BackgroundServer(make_config(tiny_model_dirs[name]), *loaded[name]).start()
               for name in GATHERERS}
    clients = {name: TeacherClient(f"127.0.0.1:{s.port}", timeout=60) for name, s in servers.items()}
    yield clients
    for name in GATHERERS:
        clients[name].close()
        servers[name].stop()


@pytest.mark.parametrize("name", GATHERERS)
def test_gathered_logprobs_equal_a_direct_forward_at_every_character_end(name, gatherers, tiny_model_dirs):
    client = gatherers[name]
    info = client.info()
    ends = np.arange(len(TEXT) + 1)  # every end: token ends, fragments' shared ends, ends inside tokens, 0
    ids = random_ids(np.random.default_rng(1), len(ends), 5, info.vocab_size)
    got = client.score([TEXT, "a second text"], top_k=4, logprob_format=F32,
                       gather=[(ends, ids), ([], np.zeros((0, 3)))])
    first = got[0]
    logp = direct_logprobs(tiny_model_dirs[name], first.input_ids)
    want = expected(logp, first.offsets, ends, ids)
    assert first.gathered_logprobs.shape == ids.shape and first.gathered_logprobs.dtype == np.float32
    np.testing.assert_allclose(first.gathered_logprobs, want, atol=2e-5)
    assert got[1].gathered_logprobs.shape == (0, 3)
    # the cases the rule is about all occur: several tokens end at one character (the last is taken, and it
    # differs from the first), some end has no token ending at it (-inf), padding (-inf)
    stops = first.offsets[:, 1].tolist()
    shared = [e for e in set(stops) if stops.count(e) > 1]
    assert shared, stops
    for e in shared:  # (row e asks for end e)
        asked = ids[e][ids[e] >= 0]
        assert not np.allclose(logp[stops.index(e), asked], want[e][ids[e] >= 0], atol=1e-4)
    unbounded = [e for e in ends if e not in stops]
    assert unbounded and np.all(np.isneginf(first.gathered_logprobs[unbounded]))
    assert np.all(np.isneginf(first.gathered_logprobs[ids < 0]))


def test_gathered_rows_agree_with_the_top_k_of_the_same_position(gatherers):
    """Gathering a position's own top-k ids gives back its top-k log-probs (same chunked computation)."""
    client = gatherers["gpt2"]
    plain = client.score([TEXT], top_k=6, logprob_format=F32)[0]
    assert plain.gathered_logprobs is None  # not asked: not sent
    ends = np.unique(plain.offsets[:, 1])
    rows = [last_token_ending_at(plain.offsets, e) for e in ends]
    got = client.score([TEXT], top_k=6, logprob_format=F32, gather=[(ends, plain.topk_ids[rows])])[0]
    np.testing.assert_allclose(got.gathered_logprobs, plain.topk_logprobs[rows], atol=1e-6)


def test_fp16_wire_keeps_minus_inf_and_fp16_precision(gatherers):
    client = gatherers["llama"]
    ends = np.arange(len(TEXT) + 1)
    ids = random_ids(np.random.default_rng(2), len(ends), 3, client.info().vocab_size)
    full = client.score([TEXT], top_k=2, logprob_format=F32, gather=[(ends, ids)])[0].gathered_logprobs
    half = client.score([TEXT], top_k=2, gather=[(ends, ids)])[0].gathered_logprobs
    assert half.dtype == np.float16
    np.testing.assert_array_equal(np.isneginf(half), np.isneginf(full))
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=1e-3, atol=1e-3)


def test_score_stream_carries_gather_and_a_bad_one_gets_an_in_band_error(gatherers):
    client = gatherers["gpt2"]
    good = client.request([TEXT], top_k=2, logprob_format=F32, gather=[([3, 5], [[1, 2], [3, 4]])])
    bad = client.request([TEXT], top_k=2, gather=[([5, 3], [[1], [2]])])
    responses = {r.request_id: r for r in client.score_stream([good, bad])}
    assert responses[bad.request_id].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "gather[0].ends: not strictly increasing" in responses[bad.request_id].error.message
    single = client.score([TEXT], top_k=2, logprob_format=F32, gather=[([3, 5], [[1, 2], [3, 4]])])[0]
    got = codec.decode(responses[good.request_id].results[0].gathered_logprobs)
    np.testing.assert_array_equal(got, single.gathered_logprobs)


# --- truncation ------------------------------------------------------------------------------------------

def serve(tiny_model_dirs, loaded, name: str, **overrides):
    server = BackgroundServer(make_config(tiny_model_dirs[name], warmup=False, **overrides), *loaded[name]).start()
    return server, TeacherClient(f"127.0.0.1:{server.port}", timeout=60)


def gather_every_end(tiny_model_dirs, loaded, name: str, seed: int, per_end: int, **limits):
    """TEXT scored with truncation by a teacher with ``limits``, gathering ``per_end`` seeded random ids at every
    character end 0..len(TEXT): (the answer, the ends, the ids)."""
    server, client = serve(tiny_model_dirs, loaded, name, **limits)
    try:
        ends = np.arange(len(TEXT) + 1)
        ids = random_ids(np.random.default_rng(seed), len(ends), per_end, client.info().vocab_size)
        return client.score([TEXT], top_k=2, truncate=True, logprob_format=F32, gather=[(ends, ids)])[0], ends, ids
    finally:
        client.close()
        server.stop()


def test_truncation_between_the_byte_fragments_of_a_character_gives_minus_inf_there(tiny_model_dirs, loaded):
    """llama-spm spells 😀 as four byte tokens sharing its span: cut after the second, the kept tokens end at
    the emoji's end but have not read it, so that end is -inf like every end past the cut."""
    tokenizer = loaded["llama"][1]
    offsets = tokenizer.encode([TEXT])[0].offsets
    emoji = TEXT.index("😀")
    fragments = [j for j, (s, e) in enumerate(offsets.tolist()) if (s, e) == (emoji, emoji + 1)]
    assert len(fragments) == 4
    keep = fragments[1] + 1
    got, ends, ids = gather_every_end(tiny_model_dirs, loaded, "llama", 3, 4, max_tokens_per_text=keep)
    assert got.truncated and len(got.input_ids) == keep and got.offsets[-1, 1] == emoji + 1
    logp = direct_logprobs(tiny_model_dirs["llama"], got.input_ids)
    np.testing.assert_allclose(got.gathered_logprobs, expected(logp, offsets, ends, ids, kept=keep), atol=2e-5)
    assert np.all(np.isneginf(got.gathered_logprobs[emoji + 1:]))  # the emoji's end and everything after
    assert np.isfinite(got.gathered_logprobs[emoji, 0])  # the space before it was read


def test_ends_past_a_character_cut_are_minus_inf_and_up_to_the_whole_text_are_accepted(tiny_model_dirs, loaded):
    """truncate with max_chars_per_text: the text is cut before tokenizing; ends up to the length of the text
    as sent are valid, those past the cut get -inf, the others are positions of the cut text."""
    cut = 20
    got, ends, ids = gather_every_end(tiny_model_dirs, loaded, "gpt2", 4, 3, max_chars_per_text=cut)
    assert got.truncated and got.offsets[:, 1].max() <= cut
    logp = direct_logprobs(tiny_model_dirs["gpt2"], got.input_ids)
    np.testing.assert_allclose(got.gathered_logprobs, expected(logp, got.offsets, ends, ids), atol=2e-5)
    assert np.all(np.isneginf(got.gathered_logprobs[cut + 1:])) and np.isfinite(got.gathered_logprobs[cut, 0])


# --- limits and bad input --------------------------------------------------------------------------------

MAX_GATHER_IDS = 12


@pytest.fixture(scope="module")
def limited(tiny_model_dirs, loaded):
    server, client = serve(tiny_model_dirs, loaded, "gpt2", max_texts_per_request=4, max_gather_ids=MAX_GATHER_IDS)
    yield client
    client.close()
    server.stop()


def refused(client: TeacherClient, code: grpc.StatusCode, words, texts, gather) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Score(pb.ScoreRequest(texts=texts, top_k=2, gather=gather), timeout=30)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details(), err.value.details()


def test_max_gather_ids_at_the_limit_and_one_past(limited):
    assert limited.info().max_gather_ids == MAX_GATHER_IDS
    at_limit = [(range(1, 4), np.zeros((3, 3))), ([2], [[5, 6, -1]])]  # 9 + 3 ids, padding counts
    got = limited.score(["abcd", "xyz"], top_k=2, gather=at_limit)
    assert [g.gathered_logprobs.shape for g in got] == [(3, 3), (1, 3)]
    over = [encode_gather(range(1, 4), np.zeros((3, 3))), encode_gather([2], [[5, 6, -1, -1]])]
    refused(limited, grpc.StatusCode.INVALID_ARGUMENT, ("gather", "13 ids", f"max_gather_ids={MAX_GATHER_IDS}"),
            ["abcd", "xyz"], over)


def test_ids_up_to_vocab_size_minus_one_and_ends_up_to_the_text_length(limited):
    vocab = limited.info().vocab_size
    text = "héllo"
    got = limited.score([text], top_k=2, gather=[([len(text)], [[vocab - 1, GATHER_PADDING]])])[0]
    assert np.isfinite(got.gathered_logprobs[0, 0]) and np.isneginf(got.gathered_logprobs[0, 1])
    refused(limited, grpc.StatusCode.INVALID_ARGUMENT, ("gather[0].ids[0, 1]", f"={vocab} ", f"vocab_size={vocab}"),
            [text], [encode_gather([2], [[1, vocab]])])
    refused(limited, grpc.StatusCode.INVALID_ARGUMENT, ("gather[0].ends[1]=6", "texts[0]", "5 characters"),
            [text], [encode_gather([2, len(text) + 1], [[1], [2]])])


def u32(values, shape=None, dtype: str = "<u4") -> pb.Array:
    array = np.asarray(values, dtype=dtype)
    return codec.encode(array.reshape(shape) if shape is not None else array)


BAD_GATHERS = {
    "one per text": (["ab", "cd"], [encode_gather([1], [[1]])], ("gather: 1 GatherSpecs for 2 texts",)),
    "ends not increasing": (["abcd"], [encode_gather([1, 3, 3], [[1], [2], [3]])],
                            ("gather[0].ends: not strictly increasing", "ends[2]=3 follows ends[1]=3")),
    "ends decreasing": (["abcd"], [encode_gather([3, 1], [[1], [2]])], ("ends[1]=1 follows ends[0]=3",)),
    "ends dtype": (["abcd"], [pb.GatherSpec(ends=u32([1], dtype="<u2"), ids=u32([[1]]))],
                   ("gather[0].ends: dtype D_TYPE_UINT16", "D_TYPE_UINT32")),
    "ids dtype": (["abcd"], [pb.GatherSpec(ends=u32([1]), ids=codec.encode(np.array([[1]], "<f4")))],
                  ("gather[0].ids: dtype D_TYPE_FLOAT32",)),
    "ids 1-D": (["abcd"], [pb.GatherSpec(ends=u32([1, 2]), ids=u32([1, 2]))],
                ("gather[0].ids: shape [2] has 1 dimensions", "(m, c)")),
    "ends 2-D": (["abcd"], [pb.GatherSpec(ends=u32([[1, 2]]), ids=u32([[1, 2]]))],
                 ("gather[0].ends: shape [1, 2] has 2 dimensions", "(m,)")),
    "rows and ends differ": (["abcd"], [pb.GatherSpec(ends=u32([1, 2]), ids=u32([[1], [2], [3]]))],
                             ("gather[0].ids: shape [3, 1] has 3 rows for 2 ends",)),
    "data and shape differ": (["abcd"], [pb.GatherSpec(ends=u32([1]), ids=pb.Array(
        dtype=pb.D_TYPE_UINT32, shape=[1, 2], data=b"\x00" * 4))], ("gather[0].ids: Array data has 4 bytes",)),
    "second text": (["abcd", "ef"], [encode_gather([1], [[1]]), encode_gather([0, 3], [[1], [1]])],
                    ("gather[1].ends[1]=3 is past the end of texts[1] (2 characters)",)),
}


@pytest.mark.parametrize("case", BAD_GATHERS)
def test_bad_gather_is_invalid_argument_naming_the_field(limited, case):
    texts, gather, words = BAD_GATHERS[case]
    refused(limited, grpc.StatusCode.INVALID_ARGUMENT, words, texts, gather)
    assert limited.score(["still alive"], top_k=2, gather=[([3], [[1]])])[0].gathered_logprobs.shape == (1, 1)


def test_a_teacher_configured_not_to_gather_refuses_with_failed_precondition(tiny_model_dirs, loaded):
    server, client = serve(tiny_model_dirs, loaded, "gpt2", max_gather_ids=0)
    try:
        assert client.info().max_gather_ids == 0
        refused(client, grpc.StatusCode.FAILED_PRECONDITION, ("gather", "cannot gather", "max_gather_ids = 0"),
                ["abc"], [encode_gather([1], [[1]])])
        assert client.score(["abc"], top_k=2)[0].gathered_logprobs is None  # without gather: served as ever
    finally:
        client.close()
        server.stop()


def test_a_vllm_teacher_advertises_no_gather_and_refuses_it(tiny_model_dirs, loaded):
    """The vLLM backend (over the fake async engine) cannot gather: max_gather_ids is 0 whatever the config
    says, and a request with gather gets FAILED_PRECONDITION naming the backend, before any forward."""
    from teacher_server.backends.vllm import VLLMBackend

    from .backends.fake_vllm import FakeAsyncLLM, api, toy_logprobs

    engine = FakeAsyncLLM(toy_logprobs, 64)
    config = make_config(tiny_model_dirs["llama"], warmup=False, max_top_k=8, default_top_k=4)
    assert config.max_gather_ids > 0  # backend=hf in the config: the backend object decides
    with BackgroundServer(config, VLLMBackend(engine, api()), loaded["llama"][1]) as server, \
            TeacherClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        assert client.info().backend == "vllm" and client.info().max_gather_ids == 0
        refused(client, grpc.StatusCode.FAILED_PRECONDITION, ("backend vllm", "cannot gather"),
                ["abc"], [encode_gather([1], [[1]])])
    assert not engine.steps  # refused before the engine saw it


def test_gathered_bytes_count_in_the_response_size_at_the_limit_and_one_past(tiny_model_dirs, loaded):
    """max_message_bytes set to exactly the bound of a request gathering G ids: it is served; gathering G + 1
    it is refused before the forward (were the gathered bytes left out of the bound, it would be let through)."""
    backend, tokenizer = loaded["gpt2"]
    text, k, many = "words and more words " * 6, 4, 24
    tokens = len(tokenizer.encode([text])[0].ids)
    limit = response_bytes([(tokens, len(text))], k, backend.vocab_size, 4, gathered_ids=many)
    valid = make_config(tiny_model_dirs["gpt2"], warmup=False)
    config = TeacherConfig.model_construct(**{**valid.model_dump(), "max_message_bytes": limit})
    with BackgroundServer(config, backend, tokenizer) as server, \
            TeacherClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        got = client.score([text], top_k=k, logprob_format=F32, gather=[([5], np.ones((1, many)))])[0]
        assert got.gathered_logprobs.shape == (1, many)
        with pytest.raises(ResponseTooLarge) as err:
            client.score([text], top_k=k, logprob_format=F32, gather=[([5], np.ones((1, many + 1)))])
        assert (err.value.max_message_bytes, err.value.response_bytes) == (limit, limit + 4)  # one fp32 more
        assert "fewer gathered ids" in str(err.value)
