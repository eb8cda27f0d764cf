"""On-policy vs off-policy step time, side by side in one run, and the teachers' wait share (issue 21).

    .venv/bin/python bench/on_policy.py --steps 6 --warmup 2 --rounds 2 --share 0.5 --max-new-tokens 64
    .venv/bin/python bench/on_policy.py --trainer-cpus all --teacher-cpus all --gas 4 --share 0.25

One trainer (``build_run``: the tiny llama target, DeepSpeed ZeRO-2, λ = 0.9, MinCE, MinED) and two teacher
servers (child processes, gpt2/gpt-2 and mpt/mpt: bench/online_overhead.py's setup and CPU placement). Off-policy
phases train as today (every micro-batch a corpus block, prefetched); on-policy phases make ``--share`` of the
micro-batches rollouts (a prompt of ``--prompt-tokens`` from the block, ``--max-new-tokens`` sampled by the
student on the training thread, scored by both teachers while the next rollout is generated). The phases
alternate (ABBA over rounds) on the same engine, each from micro-batch 0 with a fresh prefetcher; ``--steps``
steps are timed after ``--warmup`` untimed ones. Printed: mean step time of each mode, their ratio, and each
mode's split of the step from the trainer's own step record (generate / wait for teachers / align and fuse /
train / other).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_overhead import ROOT, _cpus, teachers_running, trainer_config  # noqa: E402

sys.path.insert(0, str(ROOT))
from student_trainer.trainer.stats import TIME_SPLIT, time_split  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    n = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per phase (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each phase (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="on/off rounds, order alternating (default 2)")
    p.add_argument("--share", type=float, default=0.5, help="on-policy: share of micro-batches that are rollouts")
    p.add_argument("--prompt-tokens", type=int, default=None, help="rollout prompt length (default: seq-len / 2)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens each rollout samples (default 64)")
    p.add_argument("--depth", type=int, default=4, help="prefetch depth of the corpus micro-batches (default 4)")
    p.add_argument("--seq-len", type=int, default=128, help="target tokens per block (default 128)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (default 2)")
    p.add_argument("--gas", type=int, default=2, help="gradient accumulation steps (default 2)")
    p.add_argument("--target-size", type=int, nargs=3, default=[128, 4, 4], metavar=("HIDDEN", "LAYERS", "HEADS"),
                   help="target llama (llama-spm tokenizer) hidden size, layers, heads (default 128 4 4)")
    p.add_argument("--teacher-size", type=int, nargs=3, default=[64, 2, 4], metavar=("HIDDEN", "LAYERS", "HEADS"),
                   help="size of each teacher (default 64 2 4)")
    p.add_argument("--device", default="cpu", help="teacher device: cpu | cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the trainer (default 1)")
    p.add_argument("--teacher-threads", type=int, default=1, help="torch threads in each teacher (default 1)")
    p.add_argument("--trainer-cpus", default="0" if n >= 2 else "all", help="CPUs of the trainer (default 0)")
    p.add_argument("--teacher-cpus", default=f"1-{n - 1}" if n >= 2 else "all",
                   help="CPUs of the teachers (default: all but CPU 0)")
    p.add_argument("--files", nargs="+", default=None, help="training text files (default: stdlib json/ email/ http/)")
    return p.parse_args(argv)


def run_phase(run, rollouts, args: argparse.Namespace) -> dict[str, float]:
    """``warmup + steps`` steps from micro-batch 0 (``rollouts`` None: off-policy); means of the timed ones."""
    from student_trainer.trainer.loop import train_step
    from student_trainer.trainer.prefetch import Prefetcher

    fusing, gas = run.sources, run.engine.gradient_accumulation_steps()
    pf = Prefetcher(run.sampler.batch, fusing, run.config.method, 0, args.depth,
                    rollouts.is_rollout if rollouts else None)
    sums = dict.fromkeys(("step", "tokens", *TIME_SPLIT), 0.0)
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        record = train_step(run, pf, None, rollouts, i * gas)
        if i >= args.warmup:
            sums["step"] += time.perf_counter() - t0
            sums["tokens"] += record.tokens
            for key in TIME_SPLIT:
                sums[key] += getattr(record, key)
    pf._workers.shutdown(wait=True, cancel_futures=True)  # drain: close() alone leaves running jobs behind
    pf.close()
    return {k: v / args.steps for k, v in sums.items()}


def _split(r: dict[str, float]) -> str:
    step = r["step"]
    other = step - r["generate_seconds"] - r["teacher_wait_seconds"] - r["train_seconds"]
    return f"{time_split(r, step)}, other {100 * other / step:.1f}%"


def compare(run, rollouts, args: argparse.Namespace) -> None:
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            res = run_phase(run, rollouts if mode == "on" else None, args)
            results[mode].append(res)
            print(f"  round {r} {mode}-policy: {res['step'] * 1e3:7.1f} ms/step, {res['tokens']:.0f} tokens/step; "
                  f"{_split(res)}; load {os.getloadavg()[0]:.1f}", flush=True)
    mean = {m: {k: statistics.fmean(x[k] for x in rs) for k in rs[0]} for m, rs in results.items()}
    per_round = ", ".join(f"{a['step'] / b['step']:.3f}" for a, b in zip(results["on"], results["off"], strict=True))
    print("\n| mode | ms/step | counted tokens/step | step split |\n|---|---:|---:|---|")
    for m in ("off", "on"):
        print(f"| {m}-policy | {mean[m]['step'] * 1e3:.1f} | {mean[m]['tokens']:.0f} | {_split(mean[m])} |")
    wait = {m: 100 * mean[m]["teacher_wait_seconds"] / mean[m]["step"] for m in mean}
    print(f"on-policy / off-policy step time: {mean['on']['step'] / mean['off']['step']:.3f}x (per round: {per_round}; "
          f"share {args.share}, {args.max_new_tokens} new tokens); teachers' wait share: on-policy {wait['on']:.1f}%, "
          f"off-policy {wait['off']:.1f}%")


def main() -> None:
    args = parse_args()
    with teachers_running(args, "on-policy-") as (tmp, models, teachers):  # pins this process's CPUs first
        import torch

        from student_trainer.trainer.config import OnPolicyConfig
        from student_trainer.trainer.rollouts import Rollouts
        from student_trainer.trainer.run_setup import build_run

        config = trainer_config(args, models, teachers, tmp / "out")
        on = OnPolicyConfig(share=args.share, prompt_tokens=args.prompt_tokens or args.seq_len // 2,
                            max_new_tokens=args.max_new_tokens)
        run = build_run(config.model_copy(update={"on_policy": on}))
        rollouts = Rollouts(run, run.engine.gradient_accumulation_steps())
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, load average {os.getloadavg()[0]:.2f}; trainer CPUs "
              f"{sorted(_cpus(args.trainer_cpus))}, teacher CPUs {sorted(_cpus(args.teacher_cpus))}")
        print(f"target llama {args.target_size}, teachers gpt2/mpt {args.teacher_size}, seq {args.seq_len}, "
              f"micro-batch {args.micro_batch}, gas {args.gas}, prefetch depth {args.depth}; on-policy: share "
              f"{args.share}, prompt {on.prompt_tokens} tokens, {args.max_new_tokens} new tokens; "
              f"{args.steps} timed steps after {args.warmup}", flush=True)
        compare(run, rollouts, args)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        rollouts.close()
        rollouts.join()
        run.logger.close()


if __name__ == "__main__":
    main()
