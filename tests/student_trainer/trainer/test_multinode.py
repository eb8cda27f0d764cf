"""Multi-node training on one machine: two trainer "nodes" of two CPU ranks each (4 ranks), started as two
``torchrun --nnodes 2 --rdzv-backend c10d`` processes that meet at a rendezvous on loopback — the command the
Kubernetes multi-node Job runs (docker/k8s/overlays/multinode) — against two replicas per source. Same
global batch, same losses and, after 5 updates of the fused loss, the same weights as one rank with gradient
accumulation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from student_trainer.trainer.config import load_trainer_config
from student_trainer.trainer.loop import train
from tests import REPO

from .helpers import (
    Teacher,
    free_port,
    kill_group,
    paragraph_corpus,
    read_metrics,
    source,
    subprocess_env,
    trainer_config,
    update_mismatch,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NODES, RANKS_PER_NODE = 2, 2
STEPS = 5


@pytest.fixture(scope="module")
def replicated(tiny_model_dirs):
    """Two live replicas of each source (round-robin over both addresses)."""
    running = {name: [Teacher(tiny_model_dirs[name]) for _ in range(2)] for name in ("gpt2", "mpt")}
    yield running
    for replicas in running.values():
        for t in replicas:
            t.stop()


def _config(tmp_path: Path, name: str, target: Path, replicated, micro: int, gas: int, stage: int) -> Path:
    """The fused loss (λ = 0.9), 5 updates of SGD at a constant lr without gradient clipping: each update follows
    the gradient's scale (Adam, or a clipped gradient, would normalise a wrong scale away), so the weights show
    whether the gradients were averaged over the ranks and the loss divided by the global token count."""
    config = trainer_config(target, tmp_path / name, [source(n, *ts) for n, ts in replicated.items()],
                            data=paragraph_corpus(tmp_path / "corpus"),
                            train={"max_steps": STEPS, "seed": 0, "deepspeed": {
                                "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
                                "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
                                "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "scheduler": None}})
    return write_config(config, tmp_path / f"{name}.yaml")


def _node(config: Path, port: int) -> subprocess.Popen:
    """One node: torchrun with this node's ranks, joining the rendezvous at 127.0.0.1:port."""
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nnodes", str(NODES),
           "--nproc-per-node", str(RANKS_PER_NODE), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", "livefuse-test", "--local-addr", "127.0.0.1", "--max-restarts", "0",
           "-m", "student_trainer", "--config", str(config)]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_two_nodes_of_two_ranks_train_like_one_rank_with_the_same_global_batch(tmp_path, target, replicated):
    # 1 rank x 4 micro-batches of 2 blocks = 4 ranks x 1 micro-batch of 2: the same 8 blocks per step (rank r
    # takes every 4th block of the seeded order) and the same global token count, hence the same losses and
    # updates. The ranks run ZeRO-2 (the paper's); the one rank ZeRO-0 (on one rank every stage is the same maths).
    world = NODES * RANKS_PER_NODE
    train(load_trainer_config(_config(tmp_path, "one", target, replicated, micro=2, gas=world, stage=0)))
    cfg, port = _config(tmp_path, "nodes", target, replicated, micro=2, gas=1, stage=2), free_port()
    nodes = [_node(cfg, port) for _ in range(NODES)]
    try:
        outputs = [node.communicate(timeout=540)[0] for node in nodes]
    finally:
        for node in nodes:
            kill_group(node)  # torchrun and its ranks, if they are still there
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-4000:]
    assert any(f'"world": {world}' in out for out in outputs), "the ranks did not form one group of 4"
    (one_steps, one_evals), (steps, evals) = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "nodes")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)) and len(evals) == 1  # global rank 0 alone writes
    for a, b in zip(one_steps, steps, strict=True):
        assert b["tokens"] == a["tokens"] and b["lr"] == a["lr"] == 0.5
        for key in ("loss", "clm_loss", "fusion_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    expected, got = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("one", "nodes"))
    mismatch = update_mismatch(got, expected, load_file(target / "model.safetensors"))
    print(f"weights apart by at most {max(mismatch.values()):.1e} of the update")
    assert max(mismatch.values()) <= 1e-3, mismatch  # measured 1.3e-5; a wrong gradient scale or token count: > 0.3
    assert evals[0]["eval"] == pytest.approx(one_evals[0]["eval"], rel=1e-5)
    served = [t.backend.calls for replicas in replicated.values() for t in replicas]
    assert all(calls > 0 for calls in served), f"a replica got no traffic: {served}"
