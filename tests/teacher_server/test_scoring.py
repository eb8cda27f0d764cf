"""What a real server returns equals a direct forward of the same model, for every tiny architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from protos import teacher_pb2 as pb
from tests.threads import Workers

pytestmark = pytest.mark.integration

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n",
    "Ünïcödé text — with emoji 😀 and\ttabs,   runs of spaces\n\nand blank lines.",
    "x",
]
NAMES = ["llama", "mpt", "gpt2", "gpt-neox"]


def reference(model_dir, text: str, k: int, bos: bool = False):
    """Plain transformers: tokenize, forward the whole sequence, log-softmax in fp32, top-k."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inp = ([tok.bos_token_id] if bos else []) + ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([inp])).logits[0].float(), -1)[int(bos):]
    top_v, top_i = logp.topk(k, -1)
    nxt = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return np.array(ids), top_i.numpy(), top_v.numpy(), nxt.numpy()


@pytest.mark.parametrize("name", NAMES)
def test_score_equals_direct_forward(name, clients, tiny_model_dirs):
    results = clients[name].score(TEXTS, top_k=8, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)
    for text, got in zip(TEXTS, results, strict=True):
        ids, top_i, top_v, nxt = reference(tiny_model_dirs[name], text, 8)
        np.testing.assert_array_equal(got.input_ids, ids)
        np.testing.assert_allclose(got.topk_logprobs, top_v, atol=2e-5)
        np.testing.assert_allclose(got.next_logprobs, nxt, atol=2e-5)
        # ids must match except where two log-probs tie within float noise
        differ = got.topk_ids != top_i
        assert np.all(np.abs(np.diff(top_v, axis=1, prepend=0))[differ] < 1e-5) or not differ.any()
        assert got.topk_ids.shape == (len(ids), 8) and got.next_logprobs.shape == (len(ids) - 1,)


def test_fp16_wire_is_within_fp16_tolerance(clients, tiny_model_dirs):
    got = clients["llama"].score(TEXTS[:2], top_k=4)
    for text, g in zip(TEXTS[:2], got, strict=True):
        _, _, top_v, nxt = reference(tiny_model_dirs["llama"], text, 4)
        assert g.topk_logprobs.dtype == np.float16
        np.testing.assert_allclose(g.topk_logprobs.astype(np.float32), top_v, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(g.next_logprobs.astype(np.float32), nxt, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_offsets_slice_the_text_into_the_tokens(name, clients, tiny_model_dirs):
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs[name])
    for text, got in zip(TEXTS, clients[name].score(TEXTS, top_k=1), strict=True):
        starts, ends = got.offsets[:, 0].astype(int), got.offsets[:, 1].astype(int)
        assert np.all(starts <= ends) and np.all(np.diff(starts) >= 0) and ends.max() <= len(text)
        for tid, s, e in zip(got.input_ids.tolist(), starts, ends, strict=True):
            piece = tok.decode([tid])
            if "\ufffd" not in piece:  # a whole character: the slice reads as the token
                assert piece.strip() == text[s:e].strip(), (name, piece, text[s:e])


@pytest.mark.parametrize("name", NAMES)
def test_alone_and_in_a_batch_of_other_lengths_agree(name, clients):
    client = clients[name]
    alone = client.score([TEXTS[1]], top_k=5, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)[0]
    mixed = client.score([TEXTS[0], TEXTS[2] * 3, TEXTS[1], TEXTS[3]], top_k=5,
                         logprob_format=pb.LOGPROB_FORMAT_FLOAT32)[2]
    np.testing.assert_array_equal(alone.input_ids, mixed.input_ids)
    np.testing.assert_allclose(alone.topk_logprobs, mixed.topk_logprobs, atol=1e-5)
    np.testing.assert_allclose(alone.next_logprobs, mixed.next_logprobs, atol=1e-5)


def test_many_concurrent_clients_get_their_own_answers(servers):
    from student_trainer.trainer.client import TeacherClient

    port = servers["gpt2"].port
    texts = [f"client {i}: " + TEXTS[i % 3] * (1 + i % 4) for i in range(12)]
    with TeacherClient(f"127.0.0.1:{port}") as c:
        expected = [c.score([t], top_k=3, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)[0] for t in texts]

    def worker(i: int) -> None:  # an exception here (a failed call, a wrong answer) fails the test
        with TeacherClient(f"127.0.0.1:{port}") as c:
            for _ in range(3):
                got = c.score([texts[i]], top_k=3, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)[0]
                np.testing.assert_array_equal(got.input_ids, expected[i].input_ids, err_msg=f"client {i}")
                np.testing.assert_allclose(got.topk_logprobs, expected[i].topk_logprobs, atol=1e-5,
                                           err_msg=f"client {i}")

    workers = Workers()
    for i in range(len(texts)):
        workers.start(worker, i, name=f"client-{i}")
    workers.join(120)


def test_score_stream_many_in_flight_matched_by_request_id(clients):
    client = clients["mpt"]
    batches = [[TEXTS[i % 4]] * (1 + i % 3) for i in range(10)]
    requests = [client.request(b, top_k=3) for b in batches]
    requests.insert(4, pb.ScoreRequest(texts=[""], request_id="bad"))  # a bad one mid-stream
    responses = {r.request_id: r for r in client.score_stream(requests)}
    assert set(responses) == {r.request_id for r in requests}
    assert responses["bad"].error.code == 3 and "texts[0]" in responses["bad"].error.message
    singles = {t: client.score([t], top_k=3)[0] for t in TEXTS}
    for req in requests:
        if req.request_id == "bad":
            continue
        got = responses[req.request_id]
        assert not got.HasField("error") and len(got.results) == len(req.texts)
        for text, result in zip(req.texts, got.results, strict=True):
            from protos.scores import decode_scores

            np.testing.assert_array_equal(decode_scores(result).input_ids, singles[text].input_ids)


def test_wire_size_per_token_within_budget(clients):
    """Packed arrays at fp16: at most 6k + 12 bytes per token (narrow ints for ids and offsets)."""
    k, text = 10, TEXTS[1] * 20
    for name in NAMES:
        request = clients[name].request([text], top_k=k)
        response = clients[name].stub.Score(request, timeout=60)
        result = response.results[0]
        n = result.input_ids.shape[0]
        data = sum(len(getattr(result, f).data) for f in
                   ("input_ids", "offsets", "topk_ids", "topk_logprobs", "next_logprobs"))
        assert data / n <= 6 * k + 12, (name, data / n)
        assert result.ByteSize() / n <= 6 * k + 12 + 1, (name, result.ByteSize() / n)


def test_add_bos_scores_with_bos_prefix_and_returns_text_tokens_only(tiny_model_dirs, loaded):
    from student_trainer.trainer.client import TeacherClient
    from teacher_server.background import BackgroundServer

    from .conftest import make_config

    with BackgroundServer(make_config(tiny_model_dirs["llama"], add_bos=True)) as server, \
            TeacherClient(f"127.0.0.1:{server.port}") as client:
        assert client.info().add_bos
        got = client.score([TEXTS[0]], top_k=4, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)[0]
    ids, top_i, top_v, nxt = reference(tiny_model_dirs["llama"], TEXTS[0], 4, bos=True)
    np.testing.assert_array_equal(got.input_ids, ids)
    np.testing.assert_allclose(got.topk_logprobs, top_v, atol=2e-5)
    np.testing.assert_allclose(got.next_logprobs, nxt, atol=2e-5)


def test_every_response_names_its_tokenizer_and_the_client_checks_it(clients):
    from student_trainer.trainer.client import FingerprintMismatch

    client = clients["llama"]
    fingerprint = client.info().tokenizer_fingerprint
    response = client.stub.Score(client.request(["check me"], top_k=2), timeout=30)
    assert response.tokenizer_fingerprint == fingerprint
    assert client.score(["check me"], top_k=2, expect_fingerprint=fingerprint)
    with pytest.raises(FingerprintMismatch, match="expected sha256:other"):
        client.score(["check me"], top_k=2, expect_fingerprint="sha256:other")
