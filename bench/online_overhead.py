"""Online overhead: the same training run with live teachers and with their responses replayed from memory,
side by side in one run, for several prefetch depths; and the fusion loss's extra peak memory (issue 4).

    .venv/bin/python bench/online_overhead.py --steps 8 --warmup 2 --rounds 2 --depths 1 2 4 8 --target-size 128 4 4
    .venv/bin/python bench/online_overhead.py --depths 1 4 --trainer-cpus all --teacher-cpus all --skip-memory

Live: two teacher servers (``python -m teacher_server``, one child process each, different architectures and
tokenizers: gpt2/gpt-2 and mpt/mpt) and the real trainer (``build_run`` + ``Prefetcher`` + ``train_step``,
DeepSpeed ZeRO-2, λ=0.9, MinCE, MinED). Replay: the same ``Run`` and the same micro-batches, but every
``Source.fetch`` returns the ``TeacherOutput`` list recorded from a live pass (in memory, keyed by the texts),
so alignment and fusion still run in the prefetch threads and the only difference is gRPC + teacher compute.
Live and replay phases alternate (ABBA over rounds) so drift on a shared machine hits both alike; each phase
restarts the prefetcher at micro-batch 0 and times ``--steps`` steps after ``--warmup`` untimed ones.

CPU placement: ``--trainer-cpus`` / ``--teacher-cpus`` pin the trainer process and the teacher processes
(``taskset``); the default on a 2-core machine is trainer on CPU 0, both teachers on CPU 1, i.e. the
teachers have a core of their own. ``--trainer-cpus all --teacher-cpus all`` makes them share every core.

Memory: one child process per mode (fusion λ=0.9 vs CLM-only λ=1) builds the same DeepSpeed engine and runs
``train_step`` on the same recorded micro-batch (one warm-up step, which creates the optimizer state, then a
measured one) under ``torch.profiler`` with ``profile_memory=True``, started before the model is loaded.
The profiler's CPU allocator counter ("Total Allocated": bytes allocated since profiling began and not yet
freed) gives, per mode, the live tensor bytes before the measured step (model, grads, optimizer state,
DeepSpeed buffers) and its peak during the step; the step's own part (activations, logits, loss buffers,
gradients in flight) is the difference. ``ru_maxrss`` of each child is printed as a coarse cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALLOWED_CPUS = frozenset(os.sched_getaffinity(0))  # before the trainer pins itself
TEACHERS = {"gpt2": ("gpt2", "gpt-2"), "mpt": ("mpt", "mpt")}  # name -> (architecture, tokenizer)


def _cpus(spec: str) -> set[int]:
    """'all' | '0' | '0,1' | '0-3' -> CPU ids (intersected with those this process may use)."""
    allowed = ALLOWED_CPUS
    if spec == "all":
        return set(allowed)
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    if not out <= allowed:
        raise SystemExit(f"CPUs {sorted(out - allowed)} are not available here (have {sorted(allowed)})")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    n = len(ALLOWED_CPUS)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per phase (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each phase (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="live/replay rounds per depth, order alternating (default 2)")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8], help="prefetch depths to sweep (default 1 2 4 8)")
    p.add_argument("--seq-len", type=int, default=256, help="target tokens per block (default 256)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (default 2)")
    p.add_argument("--gas", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--target-size", type=int, nargs=3, default=[128, 4, 4], metavar=("HIDDEN", "LAYERS", "HEADS"),
                   help="target llama (llama-spm tokenizer) hidden size, layers, heads (default 128 4 4)")
    p.add_argument("--teacher-size", type=int, nargs=3, default=[64, 2, 4], metavar=("HIDDEN", "LAYERS", "HEADS"),
                   help="size of each teacher (gpt2/gpt-2 and mpt/mpt) (default 64 2 4)")
    p.add_argument("--device", default="cpu", help="teacher device: cpu | cuda (default cpu); the trainer uses DeepSpeed's accelerator; "
                   "the memory part reads the CPU allocator, so pass --skip-memory with cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the trainer (default 1)")
    p.add_argument("--teacher-threads", type=int, default=1, help="torch threads in each teacher (default 1)")
    p.add_argument("--trainer-cpus", default="0" if n >= 2 else "all",
                   help="CPUs the trainer process runs on: all | 0 | 0,1 | 0-3 (default: 0 on >=2 cores)")
    p.add_argument("--teacher-cpus", default=f"1-{n - 1}" if n >= 2 else "all",
                   help="CPUs the teacher processes run on (default: all but CPU 0 on >=2 cores)")
    p.add_argument("--files", nargs="+", default=None,
                   help="training text files (default: the standard library's json/, email/ and http/ .py files)")
    p.add_argument("--skip-memory", action="store_true", help="skip the fusion vs CLM-only peak memory part")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: "fusion|clm:MODEL:BATCH"
    return p.parse_args(argv)


# ---------------------------------------------------------------- setup


def build_models(args: argparse.Namespace, root: Path) -> dict[str, Path]:
    from student_trainer.demo.assets import build_tiny_model

    h, lay, hd = args.target_size
    models = {"target": build_tiny_model("llama", "llama-spm", root / "target", hidden=h, layers=lay, heads=hd,
                                         max_len=max(2048, args.seq_len))}
    h, lay, hd = args.teacher_size
    for i, (name, (arch, tok)) in enumerate(TEACHERS.items()):
        models[name] = build_tiny_model(arch, tok, root / name, hidden=h, layers=lay, heads=hd, seed=i + 1,
                                        max_len=max(2048, 4 * args.seq_len))
    return models


def start_teachers(args: argparse.Namespace, models: dict[str, Path]) -> list:
    from student_trainer.demo.teacher_process import TeacherProcess

    cpus = ",".join(map(str, sorted(_cpus(args.teacher_cpus))))
    os.environ.update(OMP_NUM_THREADS=str(args.teacher_threads), MKL_NUM_THREADS=str(args.teacher_threads))
    teachers = []
    for name in TEACHERS:
        tp = TeacherProcess(models[name], "--device", args.device, "--tokenizer-threads", "1", name=name)
        tp.cmd = ["taskset", "-c", cpus, *tp.cmd]  # the child would otherwise inherit the trainer's CPUs
        teachers.append(tp.start())
    return teachers


def trainer_config(args: argparse.Namespace, models: dict[str, Path], teachers: list, out: Path):
    import sysconfig

    from student_trainer.trainer.config import load_trainer_config

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = args.files or sorted(str(f) for d in ("json", "email", "http") for f in (stdlib / d).glob("*.py"))
    sources = ", ".join(f"{{name: {t.name}, endpoints: ['{t.address}']}}" for t in teachers)
    ds = (f"{{train_micro_batch_size_per_gpu: {args.micro_batch}, gradient_accumulation_steps: {args.gas}, "
          "optimizer: {params: {lr: 0.0001}}}")
    return load_trainer_config(None, [
        f"target.model={models['target']}", f"data.train_files={files}", f"data.seq_len={args.seq_len}",
        f"data.min_block_tokens={args.seq_len}", "data.validation_fraction=0.05", f"run.output_dir={out}",
        "run.resume=false", "run.progress=false", "train.max_steps=1000000", "method.lambda_clm=0.9",
        f"sources=[{sources}]", f"train.deepspeed={ds}"])


# ---------------------------------------------------------------- live vs replay


class Recorder:
    """Wraps each source's fetch: ``live`` records every response by its texts, ``replay`` serves them back."""

    def __init__(self, sources: list) -> None:
        self.live = {s.name: s.fetch for s in sources}
        self.store: dict[tuple[str, tuple[str, ...]], object] = {}
        self.sources = sources

    def use(self, mode: str) -> None:
        for s in self.sources:
            s.fetch = self._live(s.name) if mode == "live" else self._replay(s.name)

    def _live(self, name: str):
        def fetch(texts, gather=None):  # off-policy micro-batches: no gather
            out = self.live[name](texts, gather)
            self.store[(name, tuple(texts))] = out
            return out
        return fetch

    def _replay(self, name: str):
        def fetch(texts, gather=None):
            return self.store[(name, tuple(texts))]  # KeyError = a text the live pass never fetched
        return fetch


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of other processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def _thread_sched() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of the calling thread, from schedstat."""
    run_ns, wait_ns, _ = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat").read_text().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def run_phase(run, depth: int, steps: int, warmup: int, teacher_pids: list[int]) -> dict[str, float]:
    """Trains ``warmup + steps`` steps from micro-batch 0 with a fresh prefetcher; stats of the timed steps."""
    from student_trainer.trainer.loop import train_step
    from student_trainer.trainer.prefetch import Prefetcher

    pf = Prefetcher(run.sampler.batch, run.sources, run.config.method, 0, depth)
    times, waits, fetch = [], [], []
    cpu0 = tcpu0 = 0.0
    sched0 = (0.0, 0.0)
    for i in range(warmup + steps):
        if i == warmup:
            cpu0, tcpu0, sched0 = time.process_time(), _cpu_seconds(teacher_pids), _thread_sched()
        t0, w0 = time.perf_counter(), pf.wait_seconds
        record = train_step(run, pf)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            waits.append(pf.wait_seconds - w0)
            fetch.append(record.fusion.teacher_seconds)
    cpu, tcpu = (time.process_time() - cpu0) / steps, (_cpu_seconds(teacher_pids) - tcpu0) / steps
    on_cpu, queued = ((b - a) / steps for a, b in zip(sched0, _thread_sched(), strict=True))
    pf._workers.shutdown(wait=True, cancel_futures=True)  # drain: close() alone leaves running jobs behind
    pf.close()
    return {"mean": statistics.fmean(times), "median": statistics.median(times), "wait": statistics.fmean(waits),
            "fetch": statistics.fmean(fetch) / run.engine.gradient_accumulation_steps(), "cpu": cpu, "tcpu": tcpu,
            "on_cpu": on_cpu, "queued": queued}


def overhead(args: argparse.Namespace, run, pids: list[int]) -> dict[int, dict[str, list]]:
    rec = Recorder(run.sources)
    rec.use("live")  # recording pass: every micro-batch the phases will use; also warms everything up
    run_phase(run, max(args.depths), args.warmup + args.steps + max(args.depths), 0, pids)
    results: dict[int, dict[str, list]] = {d: {"live": [], "replay": []} for d in args.depths}
    for r in range(args.rounds):
        for depth in args.depths:
            for mode in (("live", "replay") if r % 2 == 0 else ("replay", "live")):
                rec.use(mode)
                res = run_phase(run, depth, args.steps, args.warmup, pids)
                results[depth][mode].append(res)
                print(f"  round {r} depth {depth} {mode:6s} mean {res['mean'] * 1e3:7.1f} ms  median "
                      f"{res['median'] * 1e3:7.1f} ms  wait {res['wait'] * 1e3:6.1f} ms  fetch {res['fetch'] * 1e3:6.1f} ms  "
                      f"CPU/step trainer {res['cpu'] * 1e3:6.1f} ms teachers {res['tcpu'] * 1e3:6.1f} ms "
                      f"train thread on-CPU {res['on_cpu'] * 1e3:6.1f} ms run-queue wait {res['queued'] * 1e3:6.1f} ms "
                      f"load {os.getloadavg()[0]:.1f}",
                      flush=True)
    rec.use("live")
    return results


def print_overhead(results: dict[int, dict[str, list]]) -> None:
    print("\n| prefetch depth | live ms/step | replay ms/step | live / replay | per-round ratios "
          "| live wait ms/step | teacher fetch ms/micro-batch | trainer CPU ms/step live / replay "
          "| teachers CPU ms/step | train thread run-queue wait ms/step live / replay |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for depth, r in results.items():
        live = statistics.fmean(x["mean"] for x in r["live"])
        rep = statistics.fmean(x["mean"] for x in r["replay"])
        per_round = ", ".join(f"{a['mean'] / b['mean']:.3f}" for a, b in zip(r["live"], r["replay"], strict=True))
        wait = statistics.fmean(x["wait"] for x in r["live"])
        fetch = statistics.fmean(x["fetch"] for x in r["live"])
        cpu_l, cpu_r = (statistics.fmean(x["cpu"] for x in r[m]) for m in ("live", "replay"))
        tcpu = statistics.fmean(x["tcpu"] for x in r["live"])
        q_l, q_r = (statistics.fmean(x["queued"] for x in r[m]) for m in ("live", "replay"))
        print(f"| {depth} | {live * 1e3:.1f} | {rep * 1e3:.1f} | {live / rep:.3f} | {per_round} "
              f"| {wait * 1e3:.1f} | {fetch * 1e3:.1f} | {cpu_l * 1e3:.0f} / {cpu_r * 1e3:.0f} | {tcpu * 1e3:.0f} "
              f"| {q_l * 1e3:.0f} / {q_r * 1e3:.0f} |")


# ---------------------------------------------------------------- memory


class _Plain:
    """A bare model where ``micro_loss`` expects the DeepSpeed engine (callable, ``.device``)."""

    def __init__(self, model) -> None:
        self.model, self.device = model, next(model.parameters()).device

    def __call__(self, **kw):
        return self.model(**kw)


def _window(events: list[dict], name: str) -> tuple[int, int]:
    """(live bytes just before the ``record_function(name)`` range, peak live bytes inside it)."""
    (rng,) = [e for e in events if e.get("name") == name and e.get("ph") == "X"]
    mem = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events
                 if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    before = [a for ts, a in mem if ts < rng["ts"]]
    return before[-1], max(a for ts, a in mem if rng["ts"] <= ts <= rng["ts"] + rng["dur"])


def memory_child(spec: str, args: argparse.Namespace) -> None:
    """In a fresh process: peak tensor bytes of one ``train_step`` (fusion or CLM-only); prints one JSON line."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    mode, model_dir, batch_file = spec.split(":", 2)
    torch.set_num_threads(args.threads)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        import deepspeed
        from transformers import AutoModelForCausalLM

        from student_trainer.trainer.config import MethodConfig
        from student_trainer.trainer.engine_config import engine_config
        from student_trainer.trainer.loop import micro_loss, train_step
        from student_trainer.trainer.run_setup import init_distributed

        init_distributed()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        params = sum(p.numel() for p in model.parameters())
        ds = engine_config({"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1},
                           torch.cuda.is_available()).for_run(100)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
        prepared = pickle.loads(Path(batch_file).read_bytes())
        method = SimpleNamespace(method=MethodConfig(lambda_clm=0.9 if mode == "fusion" else 1.0))
        run = SimpleNamespace(engine=engine, world=1, config=method)
        prefetcher = SimpleNamespace(get=lambda *_stop: prepared, wait_seconds=0.0, fuse_wait_seconds=0.0)
        train_step(run, prefetcher)  # warm-up: creates the optimizer state
        with record_function("measured_step"):
            train_step(run, prefetcher)
        # Activations only: the same forward + loss + backward on a bare copy, its .grad already allocated.
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        bare = SimpleNamespace(engine=_Plain(plain), world=1, config=method)
        for name in ("plain_warmup", "plain_fwd_bwd"):
            plain.zero_grad(set_to_none=False)
            with record_function(name):
                micro_loss(bare, prepared, float(prepared.loss_mask.sum()))[0].backward()
    trace = Path(batch_file).with_suffix(f".{mode}.json")
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    state, peak = _window(events, "measured_step")
    act_before, act_peak = _window(events, "plain_fwd_bwd")
    print(json.dumps({"mode": mode, "params": params, "state_bytes": state, "peak_bytes": peak,
                      "act_bytes": act_peak - act_before, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def memory(args: argparse.Namespace, run, model_dir: Path, tmp: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from student_trainer.trainer.prefetch import fuse_batch

    # A full-length micro-batch with real fused targets, fetched live once.
    with ThreadPoolExecutor(4) as pool:
        prepared = fuse_batch(run.sampler.batch(0), run.sources, run.config.method, pool)
    batch_file = tmp / "batch.pkl"
    batch_file.write_bytes(pickle.dumps(prepared))
    out = {}
    for mode in ("clm", "fusion"):
        cmd = [sys.executable, __file__, "--memory-child", f"{mode}:{model_dir}:{batch_file}",
               "--micro-batch", str(args.micro_batch), "--threads", str(args.threads)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            raise SystemExit(f"memory child {mode} failed:\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(lines[-1])
    c, f = out["clm"], out["fusion"]
    b, t = prepared.batch.input_ids.shape
    k = prepared.fuse_ids.shape[-1]
    mib = 2 ** 20
    print(f"\nPeak memory of one train_step, micro-batch {b} x {t} tokens, fused top-{k}, target "
          f"{c['params'] / 1e6:.2f}M params (torch.profiler CPU allocator, live tensor bytes):")
    print("| mode | state before step MiB | peak during step MiB | step's own peak MiB "
          "| fwd+loss+bwd peak, bare model MiB | process ru_maxrss MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("CLM only (λ=1)", c), ("fusion (λ=0.9)", f)):
        print(f"| {name} | {r['state_bytes'] / mib:.1f} | {r['peak_bytes'] / mib:.1f} | "
              f"{(r['peak_bytes'] - r['state_bytes']) / mib:.1f} | {r['act_bytes'] / mib:.1f} | "
              f"{r['maxrss_kb'] / 1024:.0f} |")
    extra, act_extra = f["peak_bytes"] - c["peak_bytes"], f["act_bytes"] - c["act_bytes"]
    vocab = run.engine.module.get_output_embeddings().weight.shape[0]
    print(f"fusion extra peak, whole DeepSpeed step: {extra / mib:.1f} MiB = {100 * extra / c['peak_bytes']:.1f}% of "
          f"the CLM-only step's peak (target <= 5%); forward+loss+backward only: {act_extra / mib:.1f} MiB = "
          f"{100 * act_extra / c['act_bytes']:.1f}% of CLM-only's; one (B, T, V) fp32 tensor = "
          f"{b * t * vocab * 4 / mib:.1f} MiB")


# ---------------------------------------------------------------- main


@contextmanager
def teachers_running(args: argparse.Namespace, prefix: str) -> Iterator[tuple[Path, dict[str, Path], list]]:
    """A bench's setup: this process on the trainer's CPUs with its torch threads (before any thread starts: they
    all inherit it), the tiny models in a temporary folder and their teacher servers, stopped on exit."""
    os.sched_setaffinity(0, _cpus(args.trainer_cpus))
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp_name:
        tmp = Path(tmp_name)
        models = build_models(args, tmp)
        teachers = start_teachers(args, models)
        try:
            yield tmp, models, teachers
        finally:
            for t in teachers:
                t.stop()


def main() -> None:
    args = parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    if args.device != "cpu" and not args.skip_memory:
        raise SystemExit("the memory part measures CPU tensors only (torch.profiler CPU allocator): add --skip-memory")
    with teachers_running(args, "online-overhead-") as (tmp, models, teachers):  # pins this process's CPUs first
        import torch

        from student_trainer.trainer.run_setup import build_run

        run = build_run(trainer_config(args, models, teachers, tmp / "out"))
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}; trainer CPUs "
              f"{sorted(_cpus(args.trainer_cpus))} ({args.threads} torch threads), teacher CPUs "
              f"{sorted(_cpus(args.teacher_cpus))} ({args.teacher_threads} each)")
        print(f"target llama {args.target_size}, teachers gpt2/mpt {args.teacher_size}, seq {args.seq_len}, "
              f"micro-batch {args.micro_batch}, gas {args.gas}, {args.steps} timed steps after {args.warmup}",
              flush=True)
        results = overhead(args, run, [t.proc.pid for t in teachers])
        print_overhead(results)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        if not args.skip_memory:
            memory(args, run, models["target"], tmp)
        run.logger.close()


if __name__ == "__main__":
    main()
