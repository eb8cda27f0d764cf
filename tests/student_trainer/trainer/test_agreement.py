"""Ranks agree on a source failure: when exactly one rank's source fails, in a step or in an evaluation, every
rank raises the same error (the failing rank's kind and message) instead of one rank leaving the others in a
collective. Two real gloo ranks; the full trainer under the same failures: test_multirank_failures.py."""

from __future__ import annotations

import multiprocessing
import os
import traceback

import pytest
import torch

from student_trainer.trainer.sources import SourceChanged, SourceFailed
from tests.student_trainer.trainer.helpers import free_port
from tests.student_trainer.trainer.test_evaluation import _run

WORLD = 2
pytestmark = pytest.mark.slow  # two processes importing torch: ~15 s on 2 cores


class _OneRankFails:
    """Raises ``error`` on the rank that holds it, answers like a healthy source elsewhere."""

    def __init__(self, error: Exception | None) -> None:
        self.name, self.error = "gpt2", error

    def fetch(self, texts, gather=None):
        if self.error is not None:
            raise self.error
        return None  # down under policy skip: no score, but no failure either


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from student_trainer.trainer.agreement import agreed_failure, failure_flag

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        step_error = SourceFailed("source 'gpt2' failed: UNAVAILABLE: scripted") if rank == 1 else None
        flag = torch.tensor([3.0, failure_flag(step_error)])  # the step's token count and the failure flag
        dist.all_reduce(flag)
        agreed = agreed_failure(step_error, rank, WORLD) if flag[1] > 0 else None
        run = _run(_OneRankFails(SourceChanged("source 'gpt2' came back with tokenizer sha256:b") if rank == 1
                                 else None))
        run.rank, run.world, run.engine.device = rank, WORLD, torch.device("cpu")
        try:
            run.evaluate()
            eval_error = None
        except (SourceFailed, SourceChanged) as err:
            eval_error = err
        results.put((rank, type(agreed).__name__, str(agreed), type(eval_error).__name__, str(eval_error)))
    except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
        results.put((rank, "crash", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def test_every_rank_raises_the_failing_ranks_error_in_a_step_and_in_an_evaluation():
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = dict(sorted((r[0], r[1:]) for r in (results.get(timeout=120) for _ in range(WORLD))))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(r[0] != "crash" for r in got.values()), got
    step = "source 'gpt2' failed: UNAVAILABLE: scripted (on rank 1 of 2)"
    changed = "source 'gpt2' came back with tokenizer sha256:b (on rank 1 of 2)"
    assert got == {r: ("SourceFailed", step, "SourceChanged", changed) for r in range(WORLD)}
