"""TLS (server certificate, optional client certificates) and a bearer token on every RPC but the health
service, with a throwaway CA made by the test. Without valid credentials a request gets UNAUTHENTICATED
(token) before its body is read, or no connection (TLS), and nothing else."""

from __future__ import annotations

import datetime
import ipaddress
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import teacher_pb2 as pb
from student_trainer.trainer.client import ClientTLS, TeacherClient
from teacher_server.background import BackgroundServer
from tests import REPO

from .conftest import make_config

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token-for-tests"


def _cert(name: str, key, issuer_name, issuer_key, ca: bool, sans=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, key, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


def make_ca(folder: Path, name: str) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = _cert(name, ca_key, ca_name, ca_key, ca=True)
    _, ca_path = _write(folder, f"{name}-ca", ca_key, ca)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    srv_key_path, srv_path = _write(folder, f"{name}-server", srv_key,
                                    _cert("teacher", srv_key, ca_name, ca_key, ca=False, sans=sans))
    cli_key = ec.generate_private_key(ec.SECP256R1())
    cli_key_path, cli_path = _write(folder, f"{name}-client", cli_key,
                                    _cert("trainer", cli_key, ca_name, ca_key, ca=False))
    return {"ca": ca_path, "server_cert": srv_path, "server_key": srv_key_path, "client_cert": cli_path,
            "client_key": cli_key_path}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, dict[str, str]]:
    folder = tmp_path_factory.mktemp("pki")
    (folder / "token").write_text(TOKEN + "\n")
    return {"good": make_ca(folder, "livefuse-test-ca"), "other": make_ca(folder, "some-other-ca"),
            "token": {"path": str(folder / "token")}}


@pytest.fixture(scope="module")
def secure_server(tiny_model_dirs, loaded, pki):
    """Mutual TLS + bearer token."""
    backend, tokenizer = loaded["gpt2"]
    good = pki["good"]
    config = make_config(tiny_model_dirs["gpt2"], tls_cert=good["server_cert"], tls_key=good["server_key"],
                         tls_client_ca=good["ca"], auth_token_file=pki["token"]["path"])
    with BackgroundServer(config, backend, tokenizer) as server:
        yield server


def client(server, tls: ClientTLS | None, token: str | None) -> TeacherClient:
    return TeacherClient(f"127.0.0.1:{server.port}", tls=tls, token=token, timeout=10, max_attempts=1)


def full_tls(pki, which: str = "good") -> ClientTLS:
    c = pki[which]
    return ClientTLS(ca_cert=pki["good"]["ca"], client_cert=c["client_cert"], client_key=c["client_key"])


def test_valid_certificate_and_token_are_served(secure_server, pki):
    with client(secure_server, full_tls(pki), TOKEN) as c:
        assert c.info().architecture == "GPT2LMHeadModel"
        assert c.score(["hello over TLS"], top_k=3)[0].topk_ids.shape[1] == 3
        assert len(c.vocab()) == c.info().vocab_size
        assert len(list(c.score_stream([c.request(["a"], 2), c.request(["b"], 2)]))) == 2


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"])
def test_bad_or_missing_token_gets_unauthenticated_on_every_rpc(secure_server, pki, token):
    with client(secure_server, full_tls(pki), token) as c:
        calls = {
            "GetInfo": lambda: c.info(timeout=10),
            "GetVocab": lambda: c.vocab(timeout=10),
            "Score": lambda: c.score(["x"], top_k=1),
            "ScoreStream": lambda: list(c.score_stream([c.request(["x"], 1)])),
            "Reflection": lambda: list(reflection_pb2_grpc.ServerReflectionStub(c.channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=c.metadata)),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert err.value.details() == "missing or invalid bearer token", name


def test_health_answers_without_a_token_and_says_only_the_status(secure_server, pki):
    """Load balancers, Kubernetes gRPC probes and gRPC's client-side health checking send no token."""
    with client(secure_server, full_tls(pki), None) as c:
        response = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert response.ListFields() == [(health_pb2.HealthCheckResponse.DESCRIPTOR.fields_by_name["status"], 1)]


def test_plaintext_client_cannot_talk_to_a_tls_server(secure_server):
    with client(secure_server, None, TOKEN) as c, pytest.raises(grpc.RpcError) as err:
        c.stub.GetInfo(pb.GetInfoRequest(), timeout=5, metadata=c.metadata)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_untrusted_server_certificate_is_refused(secure_server, pki):
    other = pki["other"]
    tls = ClientTLS(ca_cert=other["ca"], client_cert=pki["good"]["client_cert"], client_key=pki["good"]["client_key"])
    with client(secure_server, tls, TOKEN) as c, pytest.raises(grpc.RpcError) as err:
        c.stub.GetInfo(pb.GetInfoRequest(), timeout=5, metadata=c.metadata)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("cert", ["none", "other-ca"])
def test_client_without_a_trusted_certificate_is_refused_under_mutual_tls(secure_server, pki, cert):
    tls = ClientTLS(ca_cert=pki["good"]["ca"]) if cert == "none" else full_tls(pki, "other")
    with client(secure_server, tls, TOKEN) as c, pytest.raises(grpc.RpcError) as err:
        c.stub.GetInfo(pb.GetInfoRequest(), timeout=5, metadata=c.metadata)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_tls_without_client_certificates_and_token_over_plaintext(tiny_model_dirs, loaded, pki):
    backend, tokenizer = loaded["gpt2"]
    good = pki["good"]
    tls_only = make_config(tiny_model_dirs["gpt2"], tls_cert=good["server_cert"], tls_key=good["server_key"])
    with BackgroundServer(tls_only, backend, tokenizer) as server, \
            client(server, ClientTLS(ca_cert=good["ca"], server_name="localhost"), None) as c:
        assert c.score(["server-side TLS only"], top_k=2)
    token_only = make_config(tiny_model_dirs["gpt2"], auth_token_file=pki["token"]["path"])
    with BackgroundServer(token_only, backend, tokenizer) as server:
        with client(server, None, TOKEN) as c:
            assert c.score(["token, no TLS"], top_k=2)
        with client(server, None, None) as c, pytest.raises(grpc.RpcError) as err:
            c.score(["no token"], top_k=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_trainer_source_connects_with_tls_and_token(secure_server, pki, tmp_path):
    from student_trainer.trainer.config import SourceConfig
    from student_trainer.trainer.sources import Source

    good = pki["good"]
    config = SourceConfig(name="secure", endpoints=[f"127.0.0.1:{secure_server.port}"], auth_token_file=pki["token"]["path"],
                          tls={"ca_cert": good["ca"], "client_cert": good["client_cert"],
                               "client_key": good["client_key"]})
    source = Source.connect(config, ["a", "b", "Ġc"], "sha256:target", tmp_path, connect_timeout=10)
    try:
        (out,) = source.fetch(["fetched through TLS and a token"])
        assert out.topk_ids.shape[1] == config.top_k
    finally:
        source.close()


def test_security_settings_are_checked_at_load(tmp_path):
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        make_config(tmp_path, tls_cert="server.pem")
    with pytest.raises(ValueError, match="tls_client_ca needs TLS"):
        make_config(tmp_path, tls_client_ca="ca.pem")
    from student_trainer.trainer.config import TrainerConfig
    from student_trainer.trainer.inputs import check_sources

    config = TrainerConfig(target={"model": "m"}, data={"train_files": ["a.txt"]}, run={"output_dir": "out"},
                           sources=[{"name": "s", "endpoints": ["h:1"], "auth_token_file": "/nope/token"}])
    with pytest.raises(ValueError, match="sources.0.auth_token_file: file '/nope/token' does not exist"):
        check_sources(config)  # the CLI's check before a run; the config itself loads anywhere


def test_no_code_executing_format_crosses_the_wire():
    """Only protobuf messages: no pickle/marshal/dill anywhere in the server, the client or the wire code."""
    root = REPO
    for package in ("teacher_server", "protos", "student_trainer"):
        for path in (root / package).glob("*.py"):
            text = path.read_text()
            for banned in ("import pickle", "import marshal", "import dill", "import cloudpickle", "torch.load("):
                assert banned not in text, f"{path.name} uses {banned}"


@pytest.fixture(scope="module")
def token_server(tiny_model_dirs, loaded, pki):
    """Bearer token over plaintext, metrics on: what an unauthenticated caller can make the server do."""
    backend, tokenizer = loaded["gpt2"]
    config = make_config(tiny_model_dirs["gpt2"], auth_token_file=pki["token"]["path"])
    with BackgroundServer(config, backend, tokenizer) as server:
        yield server


def requests_counted(server, method: str, code: str) -> float:
    value = server.server.metrics.registry.get_sample_value(
        "livefuse_teacher_requests_total", {"method": method, "code": code})
    return value or 0.0


@pytest.mark.parametrize("method", ["Score", "GetInfo", "GetVocab", "ScoreStream"])
def test_unauthenticated_garbage_is_denied_before_it_is_parsed(token_server, method):
    before = requests_counted(token_server, method, "UNAUTHENTICATED")
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        path = f"/livefuse.v1.Teacher/{method}"
        garbage = b"\xff\xfe\x00 not a protobuf message"
        if method == "ScoreStream":
            call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as err:
                list(call(iter([garbage] * 3), timeout=10, metadata=(("authorization", "Bearer wrong"),)))
        else:
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as err:
                call(garbage, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (err.value.code(), err.value.details())
    assert err.value.details() == "missing or invalid bearer token"
    assert requests_counted(token_server, method, "UNAUTHENTICATED") == before + 1


def test_authenticated_garbage_is_invalid_argument_and_counted(token_server):
    before = requests_counted(token_server, "Score", "INVALID_ARGUMENT")
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        call = channel.unary_unary("/livefuse.v1.Teacher/Score", request_serializer=None,
                                   response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xfe\x00garbage", timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse as livefuse.v1.ScoreRequest" in err.value.details(), err.value.details()
    assert requests_counted(token_server, "Score", "INVALID_ARGUMENT") == before + 1


@pytest.mark.slow
def test_unauthenticated_huge_messages_are_not_read(tiny_model_dirs, pki):
    """Four concurrent unauthenticated 100 MB Score messages: the teacher process does not hold them."""
    import concurrent.futures

    import psutil

    from student_trainer.demo.teacher_process import TeacherProcess

    with TeacherProcess(tiny_model_dirs["gpt2"], "--device", "cpu", "--auth-token-file", pki["token"]["path"]) as t:
        process = psutil.Process(t.proc.pid)
        before = process.memory_info().rss
        peak = [before]
        body = b"\x0a" + b"\xff" * (100 * 1024 * 1024)

        def send(_: int) -> grpc.StatusCode:
            with grpc.insecure_channel(t.address, options=[("grpc.max_send_message_length", 2**30)]) as channel:
                call = channel.unary_unary("/livefuse.v1.Teacher/Score", request_serializer=None,
                                           response_deserializer=None)
                try:
                    call(body, timeout=60)
                except grpc.RpcError as err:
                    return err.code()
            return grpc.StatusCode.OK

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, i) for i in range(4)]
            while not all(f.done() for f in futures):
                peak.append(process.memory_info().rss)
                time.sleep(0.05)
        codes = [f.result() for f in futures]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert max(peak) - before < 100 * 1024 * 1024, (before, max(peak))  # not even one message held
