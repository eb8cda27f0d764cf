"""The contract from another language: a Node grpc-js client built from teacher.proto alone (node_client.cjs)
against real teachers on 127.0.0.1 reads exactly what the Python stubs read.

It checks what teacher.proto promises such a client: packed arrays decoded with a DataView (unaligned
offsets), FLOAT16 as IEEE binary16, offsets in code points (the client cuts each token's span out of the
text by code points and must get Python's slice), top_k 0 = TeacherInfo.default_top_k, token strings
decoded by TeacherInfo.vocab_encoding back to the text, and a response over grpc-js's default 4 MiB
receive limit refused until the client raises it to max_message_bytes. Skips when node or npm is missing,
or when npm cannot install @grpc/grpc-js and @grpc/proto-loader (into .tools/grpc-js, git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.scores import decode_scores
from teacher_server.background import BackgroundServer
from tests import REPO
from tests.teacher_server.conftest import make_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~30-60 s on 2 cores (one 4.7 MB response)

PACKAGES = {"@grpc/grpc-js": "1.14.7", "@grpc/proto-loader": "0.8.1"}
TOOLS = REPO / ".tools" / "grpc-js"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé — emoji 😀 and é\ttabs,  spaces\n", "x"]
BIG_TEXTS = [" ".join(["word"] * 2000)] * 6  # 12,000 tokens at k = 64 in fp32: ~4.7 MB, over 4 MiB
EXPECTED = {  # model -> (vocab_encoding, vocab_byte_fallback) of its real tokenizer
    "llama": ("VOCAB_ENCODING_SENTENCEPIECE", True),  # llama-spm
    "gpt2": ("VOCAB_ENCODING_BYTE_LEVEL", False),     # GPT-2 BPE
}


def node_modules() -> Path:
    """``.tools/grpc-js/node_modules`` with the pinned packages (installed once); skips without node/npm."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the Node grpc-js client; neither is on PATH")
    modules = TOOLS / "node_modules"

    def installed(name: str) -> str | None:
        package = modules / name / "package.json"
        return json.loads(package.read_text())["version"] if package.exists() else None

    if any(installed(name) != ver for name, ver in PACKAGES.items()):
        run = subprocess.run(["npm", "install", "--prefix", str(TOOLS), "--no-save", "--no-audit", "--no-fund",
                              "--loglevel=error", *(f"{n}@{v}" for n, v in PACKAGES.items())],
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            pytest.skip(f"npm install {' '.join(PACKAGES)} failed (no registry?): {run.stderr[-500:]}")
    return modules


def run_node(port: int, modules: Path, big: bool) -> dict:
    request = json.dumps({"texts": TEXTS, "top_k": 5, **({"big_texts": BIG_TEXTS} if big else {})})
    run = subprocess.run(["node", str(Path(__file__).with_name("node_client.cjs")), f"127.0.0.1:{port}",
                          str(REPO / "protos" / "teacher.proto"), request],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "NODE_PATH": str(modules)})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def served(request, tiny_model_dirs) -> Iterator[tuple[str, BackgroundServer]]:
    with BackgroundServer(make_config(tiny_model_dirs[request.param])) as server:
        yield request.param, server


def python_view(port: int, top_k: int, logprob_format: int) -> list:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = pb_grpc.TeacherStub(channel).Score(
            pb.ScoreRequest(texts=TEXTS, top_k=top_k, logprob_format=logprob_format), timeout=60)
    return [decode_scores(r) for r in response.results]


def assert_same(got: dict, want, text: str, k: int) -> None:
    """One text as node decoded it == as the Python codec decoded it (values bit-exact as numbers)."""
    n = len(want.input_ids)
    assert got["input_ids"] == want.input_ids.tolist()
    assert got["offsets"] == want.offsets.ravel().tolist()
    assert got["topk_ids"]["shape"] == [n, k] and got["topk_logprobs"]["shape"] == [n, k]
    assert got["topk_ids"]["values"] == want.topk_ids.ravel().tolist()
    np.testing.assert_array_equal(got["topk_logprobs"]["values"], want.topk_logprobs.astype(np.float64).ravel())
    np.testing.assert_array_equal(got["next_logprobs"], want.next_logprobs.astype(np.float64))
    assert got["pieces"] == [text[s:e] for s, e in want.offsets.tolist()]  # code points, not UTF-16 units


def test_node_client_reads_what_python_reads(served):
    modules = node_modules()
    name, server = served
    out = run_node(server.port, modules, big=name == "llama")  # the 4 MiB check once: it is the slow part
    info = out["info"]
    assert (info["vocab_encoding"], info["vocab_byte_fallback"]) == EXPECTED[name]
    assert info["default_top_k"] == server.config.default_top_k and out["vocab_size"] == info["vocab_size"]
    default_k = python_view(server.port, 0, pb.LOGPROB_FORMAT_FLOAT16)
    fp32 = python_view(server.port, 5, pb.LOGPROB_FORMAT_FLOAT32)
    for i, text in enumerate(TEXTS):
        assert out["fp16_default_k"][i]["dtypes"][1] == "D_TYPE_FLOAT16"
        assert_same(out["fp16_default_k"][i], default_k[i], text, info["default_top_k"])
        assert_same(out["fp32"][i], fp32[i], text, 5)
        # the token strings alone, decoded by the named rules, give the text back (SentencePiece may add the
        # one leading space it prefixes to every text)
        assert out["fp32"][i]["decoded"] in (text, " " + text)
    assert sum(r["unaligned"] for r in out["fp32"]) > 0  # the DataView path did meet unaligned arrays
    if name == "llama":
        assert out["big_default_limit"] == "RESOURCE_EXHAUSTED"  # grpc-js's 4 MiB default
        assert out["big_raised_limit"] == len(BIG_TEXTS)
