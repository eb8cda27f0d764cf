"""A real small LM from a GGUF file (SmolLM2-135M-Instruct, shipped in a PyPI wheel) behind the server."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from protos import teacher_pb2 as pb
from student_trainer.demo.assets import SMOLLM2_GGUF, smollm2_dir
from student_trainer.trainer.client import TeacherClient
from teacher_server.backends.hf import load_hf
from teacher_server.background import BackgroundServer

from .conftest import make_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXT = "The capital of France is Paris. The capital of Germany is Berlin."


def test_gguf_model_serves_the_same_answer_as_a_direct_forward_and_knows_paris():
    folder = smollm2_dir()
    config = make_config(folder, gguf_file=SMOLLM2_GGUF, max_top_k=10)
    backend, tokenizer = load_hf(config)  # the server's own loading path, done once (GGUF dequantizes slowly)
    with (BackgroundServer(config, backend, tokenizer) as server,
          TeacherClient(f"127.0.0.1:{server.port}", timeout=120) as client):
        info = client.info()
        got = client.score([TEXT], top_k=5, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)[0]
        vocab = client.vocab()
    assert info.architecture == "LlamaForCausalLM" and info.vocab_size == len(vocab) >= 49152
    assert isinstance(backend.model, LlamaForCausalLM) and backend.model.dtype == torch.float32
    ids = tokenizer.hf(TEXT, add_special_tokens=False)["input_ids"]  # a plain call, no server chunking
    with torch.no_grad():  # a plain forward of the loaded weights, no batching, padding or chunked head
        logp = torch.log_softmax(backend.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    np.testing.assert_array_equal(got.input_ids, ids)
    np.testing.assert_allclose(got.topk_logprobs, logp.topk(5, -1).values.numpy(), atol=1e-4)
    # a real model: after "The capital of France is" the top prediction is " Paris"
    paris = [i for i, (s, e) in enumerate(got.offsets.tolist()) if TEXT[s:e].strip() == "Paris"][0]
    assert vocab[got.topk_ids[paris - 1, 0]].replace("Ġ", " ").strip() == "Paris"
    assert float(np.mean(-got.next_logprobs)) < 4.0  # a trained LM, far below ln(49152) = 10.8
