"""What every rank must agree on before a collective: a stop request, and a source's failure.

A source fails on one rank at a time: each rank fetches its own texts, with its own timings and retry clocks.
A rank that raised at once, while the others sit in the step's all-reduce, would enter the checkpoint's
collective alone: a hang until the process group's timeout, or reductions of mismatched tensors. So a rank
that catches a source error keeps it, raises a flag in the same all-reduce as the step's token count (or the
evaluation's sums), and then every rank raises the same error — the lowest failing rank's, whose kind and
message are sent to all (one ``all_gather_object``, on the failure path only).
"""

from __future__ import annotations

import torch.distributed as dist

from student_trainer.trainer.sources import SourceChanged, SourceFailed

SourceError = SourceFailed | SourceChanged
KINDS: tuple[type[SourceError], ...] = (SourceFailed, SourceChanged)  # what the other ranks raise, by index


def failure_flag(err: SourceError | None) -> float:
    """0 for no failure, else a positive number that survives a sum over ranks."""
    return 0.0 if err is None else 1.0


def agreed_failure(err: SourceError | None, rank: int, world: int) -> SourceError:
    """Called by every rank once the all-reduce showed a failure somewhere: the error all of them raise."""
    if world == 1:
        assert err is not None, "a failure flag without an error on a single rank"
        return err
    mine = None if err is None else (int(isinstance(err, SourceChanged)), str(err))
    gathered: list[tuple[int, str] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    first = next(i for i, g in enumerate(gathered) if g is not None)
    kind, message = gathered[first]  # type: ignore[misc]
    return KINDS[kind](f"{message} (on rank {first} of {world})")
