"""fuse_batch / fuse_sequence / Prefetcher and the failure policies, with fake sources and clients (no servers)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from protos import teacher_pb2 as pb
from student_trainer.core.alignment import TeacherOutput, Tokens, make_vocab_pair
from student_trainer.trainer.config import MethodConfig, SourceConfig
from student_trainer.trainer.data.blocks import Block, collate
from student_trainer.trainer.prefetch import Prefetcher, fuse_batch, fuse_sequence
from student_trainer.trainer.sources import Source, SourceFailed
from student_trainer.trainer.stopping import Interrupted, StopFlag

VOCAB = ["a", "b", "c", "d", "▁e", "f"]
PAIR = make_vocab_pair(VOCAB, VOCAB)


def block(ids: list[int]) -> Block:
    offsets = np.array([[i, i + 1] for i in range(len(ids))], np.int64)
    return Block(np.array(ids, np.int64), offsets, "".join(VOCAB[i][-1] for i in ids))


def teacher_output(b: Block, peak: float, top: int = 0) -> TeacherOutput:
    """Same tokens as the target; every position puts ``peak`` of its top-2 on id ``top``."""
    n = len(b.ids)
    ids = np.tile(np.array([top, (top + 1) % len(VOCAB)]), (n, 1))
    lp = np.log(np.tile(np.array([peak, 1 - peak], np.float32), (n, 1)))
    return TeacherOutput(Tokens(b.ids, b.offsets), ids, lp, np.full(n - 1, np.log(peak), np.float32))


class FakeSource:
    """What fuse_batch() needs of a source: a name, a vocabulary pair and fetch()."""

    def __init__(self, name: str, peak: float, top: int = 0, down: bool = False) -> None:
        self.name, self.pair, self.peak, self.top, self.down = name, PAIR, peak, top, down
        self.fetched: list[list[str]] = []

    def fetch(self, texts, gather=None):
        self.fetched.append(list(texts))
        return None if self.down else [teacher_output(self.blocks[t], self.peak, self.top) for t in texts]


@pytest.fixture
def batch():
    blocks = [block([0, 1, 2, 3]), block([4, 5, 0])]
    return collate(7, blocks, pad_id=0)


def _sources(batch, *sources: FakeSource) -> list[FakeSource]:
    for s in sources:
        s.blocks = {b.text: b for b in batch.blocks}
    return list(sources)


def test_min_ce_takes_the_lower_ce_source_and_counts_it(batch):
    from concurrent.futures import ThreadPoolExecutor

    strong, weak = FakeSource("strong", 0.9, top=2), FakeSource("weak", 0.3, top=3)
    with ThreadPoolExecutor(2) as pool:
        p = fuse_batch(batch, _sources(batch, weak, strong), MethodConfig(fusion="min_ce"), pool)
    assert p.fuse_ids.shape == (2, 4, 2) and p.batch.index == 7
    assert (p.fuse_ids[0, :3, 0] == 2).all()  # the strong source's top id on every predicting position
    st = p.stats
    assert (st.sequences, st.micro_batches, st.predicted_positions, st.aligned_positions) == (2, 1, 5, 5)
    assert st.sources["strong"].selected == 2 and st.sources["weak"].selected == 0
    assert st.sources["strong"].ce_count == 2 and st.no_teacher_sequences == 0
    assert p.loss_mask.tolist() == [[True, True, True, False], [True, True, False, False]]


def test_a_skipped_source_is_left_out_and_none_left_gives_one_hot(batch):
    from concurrent.futures import ThreadPoolExecutor

    up, down = FakeSource("up", 0.6), FakeSource("down", 0.9, down=True)
    with ThreadPoolExecutor(2) as pool:
        p = fuse_batch(batch, _sources(batch, up, down), MethodConfig(fusion="avg_ce"), pool)
        none = fuse_batch(batch, _sources(batch, FakeSource("gone", 0.5, down=True)), MethodConfig(), pool)
    assert p.stats.sources["down"].skipped == 2 and p.stats.sources["up"].weight == pytest.approx(2.0)
    assert none.stats.no_teacher_sequences == 2 and none.stats.aligned_positions == 0
    assert none.fuse_ids[0, :3, 0].tolist() == [1, 2, 3]  # the gold next tokens


def test_fuse_sequence_with_one_source_is_that_source(batch):
    b = batch.blocks[0]
    src = _sources(batch, FakeSource("only", 0.7, top=1))[0]
    targets, weights, winner, ces = fuse_sequence(Tokens(b.ids, b.offsets), [src.fetch([b.text])[0]], [src],
                                                  MethodConfig(fusion="avg_ce"))
    assert winner == 0 and weights.tolist() == [1.0] and ces[0] == pytest.approx(-np.log(0.7), rel=1e-5)
    assert targets.aligned[:3].all() and (targets.ids[:3, 0] == 1).all()


def test_prefetcher_returns_micro_batches_in_order_and_a_stop_interrupts_its_wait(batch):
    gate = threading.Event()

    def make(index: int):
        if index >= 2:
            gate.wait(10)
        return collate(index, batch.blocks, 0)

    pf = Prefetcher(make, [], MethodConfig(), start_index=0, depth=2)
    assert [pf.get().batch.index for _ in range(2)] == [0, 1]
    stop = StopFlag()
    threading.Timer(0.3, stop.request).start()
    t0 = time.perf_counter()
    with pytest.raises(Interrupted):
        pf.get(stop)  # micro-batch 2 is held: the stop ends the wait
    assert time.perf_counter() - t0 < 5
    gate.set()
    pf.close()
    pf.join()


class FakeClient:
    """Answers Score from a script of outcomes: a status code to raise, or 'ok'."""

    def __init__(self, script: list[str]) -> None:
        self.script, self.calls, self.closed = list(script), 0, False

    def score(self, texts, **_kwargs):
        self.calls += 1
        outcome = self.script.pop(0) if self.script else "ok"
        if outcome != "ok":
            raise _RpcError(getattr(grpc.StatusCode, outcome))
        return []

    def close(self) -> None:
        self.closed = True


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "scripted"


def _source(failure: str, script: list[str], **extra) -> Source:
    config = SourceConfig(name="s", endpoints=["h:1"], failure=failure, **extra)
    return Source(config, FakeClient(script), pb.TeacherInfo(tokenizer_fingerprint="sha256:x"), PAIR)


def test_policy_wait_retries_until_the_source_is_back():
    source = _source("wait", ["UNAVAILABLE", "UNAVAILABLE"])
    assert source.fetch(["x"]) == [] and source.client.calls == 3


def test_policy_wait_gives_up_after_wait_max_s():
    source = _source("wait", ["UNAVAILABLE"] * 100, wait_max_s=0.4)
    with pytest.raises(SourceFailed, match="did not come back within wait_max_s=0.4"):
        source.fetch(["x"])


def test_policy_skip_returns_none_and_fail_raises():
    assert _source("skip", ["DEADLINE_EXCEEDED"]).fetch(["x"]) is None
    with pytest.raises(SourceFailed, match="failed: UNAVAILABLE"):
        _source("fail", ["UNAVAILABLE"]).fetch(["x"])


def test_a_non_transient_error_fails_under_every_policy():
    with pytest.raises(SourceFailed, match="refused a request: INVALID_ARGUMENT"):
        _source("wait", ["INVALID_ARGUMENT"]).fetch(["x"])


def test_close_ends_a_waiting_fetch_at_once():
    source = _source("wait", ["UNAVAILABLE"] * 1000)
    threading.Timer(0.5, source.close).start()
    t0 = time.perf_counter()
    with pytest.raises(SourceFailed, match="was closed"):
        source.fetch(["x"])
    assert time.perf_counter() - t0 < 5 and source.client.closed


def test_a_success_on_another_thread_while_one_handles_a_failure_is_no_crash(monkeypatch):
    """Defect: ``_broken_since`` was read and written by several prefetch threads without a lock. Thread A
    fails and marks the source broken; before it compares the time, thread B succeeds and resets the mark:
    A computed ``now - None`` (TypeError, which the loop does not catch: the run was lost)."""
    from student_trainer.trainer import sources as sources_module

    a_marked, b_done = threading.Event(), threading.Event()
    real_warning = sources_module.log.warning

    def warning(msg, *args, **kwargs):
        real_warning(msg, *args, **kwargs)
        if msg == "source failing":  # thread A, between marking the source broken and reading the mark back
            a_marked.set()
            assert b_done.wait(10), "thread B never finished"

    class PerThreadClient(FakeClient):
        def score(self, texts, **kwargs):
            self.calls += 1
            if threading.current_thread().name == "A" and self.calls == 1:
                raise _RpcError(grpc.StatusCode.UNAVAILABLE)
            return []

    monkeypatch.setattr(sources_module.log, "warning", warning)
    source = Source(SourceConfig(name="s", endpoints=["h:1"], failure="wait"), PerThreadClient([]),
                    pb.TeacherInfo(tokenizer_fingerprint="sha256:x"), PAIR)
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = source.fetch([name])
        except Exception as err:  # noqa: BLE001 - the test reports whatever escaped
            results[name] = err

    a = threading.Thread(target=run, args=("A",), name="A")
    a.start()
    assert a_marked.wait(10)
    b = threading.Thread(target=run, args=("B",), name="B")
    b.start()
    b.join(10)
    b_done.set()
    a.join(10)
    assert not a.is_alive() and not b.is_alive()
    assert results == {"A": [], "B": []}, results
