"""A source behind ONE DNS name (a Kubernetes headless Service): replicas that come and go while the client
runs are picked up and dropped by gRPC's own DNS resolver, with no failed call.

A DNS stub on 127.0.0.1 (dnslib) answers for ``teacher.test`` with loopback addresses (127.0.0.2, .3, .4 are
loopback on Linux), and the client's single endpoint names the stub as the resolver's authority:
``dns://127.0.0.1:<stub port>/teacher.test:<port>`` (gRPC's default c-ares resolver honours it). The teachers
are real servers on those addresses.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from student_trainer.trainer.client import TeacherClient, channel_target
from student_trainer.trainer.config import SourceConfig
from teacher_server.backends.hf import load_hf
from teacher_server.background import BackgroundServer
from tests.doubles import ControlledBackend
from tests.threads import Workers, wait_until

from .helpers import teacher_config

dnslib = pytest.importorskip("dnslib")
dns_server = pytest.importorskip("dnslib.server")
pytestmark = [pytest.mark.integration, pytest.mark.slow]  # gRPC re-resolves a name at most every 30 s
NAME = "teacher.test"
MAX_AGE_S = 3.0  # the teachers close connections this often, so clients re-resolve (the default is 300 s)


class Zone(dns_server.BaseResolver):
    """A records that the test changes while the client runs (TTL 1 s; gRPC ignores TTLs anyway)."""

    def __init__(self) -> None:
        self.addresses: list[str] = []

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname).rstrip(".") == NAME and request.q.qtype == dnslib.QTYPE.A:
            for address in list(self.addresses):
                reply.add_answer(dnslib.RR(request.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(address), ttl=1))
        return reply


class QuietLogger(dns_server.DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-data,-recv,-send")


@pytest.fixture
def zone():
    resolver = Zone()
    server = dns_server.DNSServer(resolver, address="127.0.0.1", port=0, logger=QuietLogger())
    server.start_thread()
    resolver.port = server.server.server_address[1]
    yield resolver
    server.stop()


class Replica:
    """A real teacher server on ``address:port`` counting the forwards it runs."""

    def __init__(self, model: Path, address: str, port: int, max_age_s: float | None = MAX_AGE_S) -> None:
        config = teacher_config(model, port).model_copy(update={
            "host": address, "max_connection_age_s": max_age_s, "max_connection_age_grace_s": 5.0})
        inner, tokenizer = load_hf(config)
        self.backend = ControlledBackend(inner)
        self.server: BackgroundServer | None = BackgroundServer(config, self.backend, tokenizer).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0)
            self.server = None


def _port_free_on(addresses: list[str]) -> int:
    with socket.socket() as s:
        s.bind((addresses[0], 0))
        port = s.getsockname()[1]
    for address in addresses[1:]:
        with socket.socket() as s:
            s.bind((address, port))
    return port


def _calls(replicas: dict[str, Replica]) -> dict[str, int]:
    return {a: r.backend.calls for a, r in replicas.items()}


def _score(client: TeacherClient, n: int) -> None:
    for i in range(n):
        client.score([f"def f{i}(x):\n    return x + {i}\n"], top_k=4)


def test_replicas_added_and_removed_behind_one_dns_name_are_picked_up_and_dropped(tiny_model_dirs, zone):
    addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = _port_free_on(addresses)
    replicas = {a: Replica(tiny_model_dirs["gpt2"], a, port) for a in addresses[:2]}
    zone.addresses = addresses[:2]
    endpoint = f"dns://127.0.0.1:{zone.port}/{NAME}:{port}"
    assert SourceConfig(name="code", endpoints=[endpoint]).endpoints == [endpoint]  # a valid trainer endpoint
    assert channel_target([endpoint]) == endpoint  # passed to gRPC's resolver as is
    client = TeacherClient([endpoint], timeout=30)
    stop = threading.Event()

    def keep_scoring() -> None:  # the trainer, fetching all along: a failed call ends it and fails the test
        while not stop.is_set():
            _score(client, 1)

    runner = Workers()
    try:
        _score(client, 8)
        assert all(r.backend.calls > 0 for r in replicas.values()), "round robin over both addresses"
        runner.start(keep_scoring, name="trainer")
        replicas["127.0.0.4"] = Replica(tiny_model_dirs["gpt2"], "127.0.0.4", port)  # scale up alone: no
        zone.addresses = addresses  # connection is lost, only the teachers' max_connection_age_s re-resolves
        wait_until(lambda: replicas["127.0.0.4"].backend.calls > 0 or bool(runner.errors), timeout=90,
                   what="traffic on the added replica")  # gRPC re-resolves at most once per 30 s
        assert not runner.errors, f"a call failed while a replica was added: {runner.errors[0]!r}"
        replicas["127.0.0.3"].stop()  # scale down: a replica goes away under load
        zone.addresses = ["127.0.0.2", "127.0.0.4"]
        at_removal = _calls(replicas)
        wait_until(lambda: min(_calls(replicas)[a] - at_removal[a] for a in ("127.0.0.2", "127.0.0.4")) >= 3
                   or bool(runner.errors), what="calls on both remaining replicas after the scale-down")
        stop.set()
        runner.join(60)  # raises the runner's failed call, if any
        before = _calls(replicas)
        _score(client, 8)
        after = {a: n - before[a] for a, n in _calls(replicas).items()}
        assert after["127.0.0.2"] > 0 and after["127.0.0.4"] > 0, after
    finally:
        stop.set()
        client.close()
        for replica in replicas.values():
            replica.stop()
