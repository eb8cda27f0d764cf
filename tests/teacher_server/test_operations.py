"""Info, vocabulary, health, reflection, metrics, and the CLI process: start, serve, drain on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from student_trainer.demo.teacher_process import TeacherProcess
from student_trainer.trainer.client import TeacherClient
from teacher_server.background import BackgroundServer
from teacher_server.tokenizer import tokenizer_fingerprint

from .conftest import make_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", ["llama", "mpt"])
def test_info_and_vocab_describe_the_model_and_tokenizer(name, clients, tiny_model_dirs, loaded):
    backend, _ = loaded[name]
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs[name])
    info = clients[name].info()
    assert info.architecture == type(backend.model).__name__
    assert info.vocab_size == backend.vocab_size >= info.tokenizer_size == len(tok)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    assert info.max_tokens_per_text <= 2048 and info.dtype == "float32" and info.device == "cpu"
    assert set(info.special_token_ids) == set(tok.all_special_ids)
    vocab = clients[name].vocab()
    assert len(vocab) == info.vocab_size
    assert vocab[:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert all(v == "" for v in vocab[len(tok):])


def test_fingerprints_depend_on_tokenizer_content_not_name(clients):
    from student_trainer.demo.assets import named_tokenizer

    prints = {clients[n].info().tokenizer_fingerprint for n in clients}
    assert len(prints) == len(clients)  # four different tokenizers
    # MPT ships GPT-NeoX's tokenizer: same content, same fingerprint
    assert tokenizer_fingerprint(named_tokenizer("mpt")) == tokenizer_fingerprint(named_tokenizer("gpt-neox"))


def test_health_is_serving_only_after_load(tiny_model_dirs, loaded):
    backend, tokenizer = loaded["gpt2"]
    server = BackgroundServer(make_config(tiny_model_dirs["gpt2"]), backend, tokenizer, load=False).start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "livefuse.v1.Teacher"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        server.load()
        for service in ("", "livefuse.v1.Teacher"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
    finally:
        server.stop()


def test_reflection_lists_the_services(servers):
    channel = grpc.insecure_channel(f"127.0.0.1:{servers['llama'].port}")
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in response.list_services_response.service}
    assert {"livefuse.v1.Teacher", "grpc.health.v1.Health"} <= names
    channel.close()


def test_metrics_endpoint_counts_tokens_and_latency(tiny_model_dirs, loaded):
    backend, tokenizer = loaded["gpt2"]
    config = make_config(tiny_model_dirs["gpt2"], metrics_port=0)
    with BackgroundServer(config, backend, tokenizer) as server, \
            TeacherClient(f"127.0.0.1:{server.port}") as client:
        n = sum(len(s.input_ids) for s in client.score(["hello metrics", "two texts here"], top_k=2))
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    lines = dict(line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))
    assert float(lines["livefuse_teacher_tokens_scored_total"]) == n
    assert float(lines['livefuse_teacher_requests_total{code="OK",method="Score"}']) == 1
    assert float(lines['livefuse_teacher_request_latency_seconds_count{method="Score"}']) == 1
    assert "livefuse_teacher_queue_tokens" in lines and "livefuse_teacher_batch_tokens_count" in lines


@pytest.mark.slow
def test_cli_serves_and_drains_in_flight_requests_on_sigterm(tiny_model_dirs):
    with TeacherProcess(tiny_model_dirs["llama"], "--device", "cpu", "--grace-seconds", "30",
                        "--max-batch-tokens", "1024", "--max-tokens-per-text", "1024") as teacher, \
            TeacherClient(teacher.address, timeout=60) as client:
        assert teacher.proc is not None
        assert client.info().architecture == "LlamaForCausalLM"
        requests = [client.request(["a fairly long text " * 50] * 4, top_k=8) for _ in range(12)]
        responses = []
        for response in client.score_stream(requests):
            if not responses:  # the first answer is back: the other 11 are in flight
                teacher.proc.send_signal(signal.SIGTERM)
            responses.append(response)
        exit_code = teacher.proc.wait(60)
    assert exit_code == 0
    assert len(responses) == 12 and not any(r.HasField("error") for r in responses)
    assert all(len(r.results) == 4 for r in responses)


def test_cli_rejects_bad_config_naming_the_field(tmp_path):
    cfg = tmp_path / "teacher.yaml"
    cfg.write_text("model: some/model\nmax_top_k: -3\n")
    run = subprocess.run([sys.executable, "-m", "teacher_server", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "max_top_k" in run.stderr and "-3" in run.stderr
    run = subprocess.run([sys.executable, "-m", "teacher_server", "--model", "x", "--dtype", "fp8"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "dtype" in run.stderr and "bfloat16" in run.stderr


def test_cli_help_documents_every_flag():
    run = subprocess.run([sys.executable, "-m", "teacher_server", "--help"], capture_output=True, text=True,
                         timeout=60)
    from teacher_server.config import TeacherConfig

    for name in TeacherConfig.model_fields:
        assert "--" + name.replace("_", "-") in run.stdout
    assert run.stdout.count("(default:") + run.stdout.count("(required)") >= len(TeacherConfig.model_fields)


def test_draining_ends_health_watch_streams_instead_of_waiting_out_the_grace(tiny_model_dirs, loaded):
    backend, tokenizer = loaded["gpt2"]
    server = BackgroundServer(make_config(tiny_model_dirs["gpt2"], grace_seconds=30), backend, tokenizer).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="livefuse.v1.Teacher"),
                                                      timeout=120)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    t0 = time.perf_counter()
    server.stop(grace=None)  # the configured 30 s grace
    stopped_s = time.perf_counter() - t0
    seen = [r.status for r in watch]  # the stream has ended: no error, and the last word is NOT_SERVING
    channel.close()
    assert seen and seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert stopped_s < 15, stopped_s  # generous; before the fix: the whole 30 s grace


def test_metrics_bind_their_own_address(tiny_model_dirs, loaded, caplog):
    backend, tokenizer = loaded["gpt2"]
    config = make_config(tiny_model_dirs["gpt2"], host="0.0.0.0", metrics_port=0, metrics_host="127.0.0.1")
    with BackgroundServer(config, backend, tokenizer) as server:
        assert server.server is not None
        assert server.server.metrics.address == ("127.0.0.1", server.metrics_port)
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
    assert b"livefuse_teacher_requests_total" in body
    assert make_config(tiny_model_dirs["gpt2"]).metrics_host is None  # default: the gRPC address (--host)


def test_metrics_open_to_the_network_beside_a_protected_grpc_port_are_warned_about(tiny_model_dirs, loaded,
                                                                                 tmp_path, caplog):
    backend, tokenizer = loaded["gpt2"]
    token = tmp_path / "token"
    token.write_text("secret\n")
    config = make_config(tiny_model_dirs["gpt2"], metrics_port=0, metrics_host="0.0.0.0",
                         auth_token_file=str(token))
    with caplog.at_level("WARNING", logger="livefuse.teacher"), BackgroundServer(config, backend, tokenizer):
        pass
    assert any("/metrics" in r.getMessage() and "0.0.0.0" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_requests_that_never_reach_the_servicer_are_counted(tiny_model_dirs, loaded):
    """Parse failures (Score, GetInfo) and calls while the model loads appear in requests_total."""
    backend, tokenizer = loaded["gpt2"]
    config = make_config(tiny_model_dirs["gpt2"], metrics_port=0)
    server = BackgroundServer(config, backend, tokenizer, load=False).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for method in ("Score", "GetInfo"):
                raw = channel.unary_unary(f"/livefuse.v1.Teacher/{method}", request_serializer=None,
                                          response_deserializer=None)
                for body in (b"\xff\xfe\x00garbage", b""):  # does not parse; parses but the model is loading
                    with pytest.raises(grpc.RpcError):
                        raw(body, timeout=10)
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        server.stop()
    for method in ("Score", "GetInfo"):
        for code in ("INVALID_ARGUMENT", "UNAVAILABLE"):
            assert f'livefuse_teacher_requests_total{{code="{code}",method="{method}"}} 1.0' in body, (method, code)
