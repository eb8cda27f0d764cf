"""Teacher throughput: raw backend vs the real gRPC server, measured side by side in one run (issue 2).

    .venv/bin/python bench/teacher_throughput.py --shape tiny --device cpu --seq-len 512 --batch-texts 4
    python3 bench/teacher_throughput.py --shape llama-7b --device cuda --seq-len 2048 --batch-texts 8 [--compile]

Raw: ``HFBackend.score`` (forward + fp32 log-softmax + top-k + copy to host) on the same token batches in a
loop. Server: ``python -m teacher_server`` as a subprocess on 127.0.0.1 with the same config, driven by
``TeacherClient`` from this process with ``--concurrency`` requests in flight; every response is decoded
with ``decode_scores`` and tokens are counted from the decoded ``input_ids``. After warm-up on both sides,
raw and server phases alternate for ``--rounds`` rounds (the idle side costs nothing), so drift on a
shared machine hits both alike; the table gives tok/s, the ratio, tokens per CPU-second and wire bytes.
Both sides use the same torch thread count (``--threads``; OMP_NUM_THREADS/MKL_NUM_THREADS for the server).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protos import teacher_pb2 as pb  # noqa: E402
from protos.scores import decode_scores  # noqa: E402
from student_trainer.demo.teacher_process import TeacherProcess  # noqa: E402
from student_trainer.trainer.client import TeacherClient  # noqa: E402
from teacher_server.backends.hf import load_hf  # noqa: E402
from teacher_server.config import TeacherConfig  # noqa: E402
from teacher_server.tokenizer import TeacherTokenizer  # noqa: E402

# Random-weight LlamaConfig shapes (saved with the Llama-2 SentencePiece tokenizer).
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
}
ARRAY_FIELDS = ("input_ids", "offsets", "topk_ids", "topk_logprobs", "next_logprobs")


# ---------------------------------------------------------------- model and texts


def build_shape(shape: str, out_dir: Path, device: str, dtype: str) -> Path:
    """Saves a random-weight Llama of ``shape`` with the llama-spm tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from student_trainer.demo.assets import named_tokenizer

    tok = named_tokenizer("llama-spm")
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    init_device = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
    save_dtype = torch.float32 if dtype in ("auto", "float32") and init_device == "cpu" else torch.bfloat16
    if dtype == "float16":
        save_dtype = torch.float16
    with torch.device(init_device):
        model = AutoModelForCausalLM.from_config(config, dtype=save_dtype)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    del model
    return out_dir


def corpus_files() -> Iterator[Path]:
    """The standard library's .py files (code plus English docstrings), tests left out, in a fixed order."""
    stdlib = Path(os.__file__).parent
    for path in sorted(stdlib.rglob("*.py")):
        if "test" not in path.relative_to(stdlib).parts[:1] and "site-packages" not in path.parts:
            yield path


def make_texts(tokenizer: TeacherTokenizer, seq_len: int, count: int) -> list[str]:
    """``count`` stdlib text pieces that the server's tokenizer turns into exactly ``seq_len`` tokens."""
    texts: list[str] = []
    for path in corpus_files():
        body = path.read_text(errors="replace")
        while len(texts) < count and len(body) > seq_len:
            window = body[: seq_len * 8]
            enc = tokenizer.encode([window])[0]
            if len(enc.ids) < seq_len:
                break
            end = int(enc.offsets[seq_len - 1][1])
            piece = window[:end]
            if len(tokenizer.encode([piece])[0].ids) == seq_len:
                texts.append(piece)
            body = body[end:]
        if len(texts) >= count:
            return texts
    if not texts:
        raise RuntimeError(f"no stdlib text reached {seq_len} tokens")
    return [texts[i % len(texts)] for i in range(count)]


# ---------------------------------------------------------------- raw backend


@dataclass
class Phase:
    tokens: int = 0
    seconds: float = 0.0
    array_bytes: int = 0
    message_bytes: int = 0
    cpu: float = 0.0         # CPU seconds spent on it (all processes involved)
    server_cpu: float = 0.0  # of which in the server process
    latencies: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def run_raw(backend, batches: list[list[np.ndarray]], top_k: int, warmup: int) -> Phase:
    """Times ``backend.score`` over ``batches`` after ``warmup`` untimed batches."""
    for batch in batches[:warmup]:
        backend.score(batch, top_k)
    phase = Phase()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for batch in batches[warmup:]:
        t1 = time.perf_counter()
        outs = backend.score(batch, top_k)
        phase.latencies.append(time.perf_counter() - t1)
        phase.tokens += sum(len(o.topk_ids) for o in outs)
    phase.seconds, phase.cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return phase


# ---------------------------------------------------------------- server subprocess


def server_flags(cfg: TeacherConfig) -> list[str]:
    """The CLI flags that give the server the same config as the raw backend."""
    flags = ["--device", cfg.device, "--dtype", cfg.dtype,
             "--compile" if cfg.compile else "--no-compile"]
    for name in ("max_batch_tokens", "max_batch_texts", "max_tokens_per_text", "max_tokens_per_request",
                 "max_queue_tokens", "pad_to_multiple_of", "default_top_k", "max_top_k"):
        flags += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    return flags


# ---------------------------------------------------------------- server client


def _count(response: pb.ScoreResponse, phase: Phase) -> None:
    """Decodes every result (as the trainer does) and adds its tokens and bytes to ``phase``."""
    if response.HasField("error"):
        raise RuntimeError(f"request {response.request_id} failed: {response.error.message}")
    for result in response.results:
        scores = decode_scores(result)
        phase.tokens += len(scores.input_ids)
        phase.array_bytes += sum(len(getattr(result, f).data) for f in ARRAY_FIELDS)
    phase.message_bytes += response.ByteSize()


def drive_stream(client: TeacherClient, texts: list[list[str]], top_k: int, concurrency: int,
                 timeout: float) -> Phase:
    """All requests on one ScoreStream, at most ``concurrency`` in flight."""
    slots = threading.Semaphore(concurrency)
    sent: dict[str, float] = {}

    def requests() -> Iterator[pb.ScoreRequest]:
        for batch in texts:
            slots.acquire()
            request = client.request(batch, top_k)
            sent[request.request_id] = time.perf_counter()
            yield request

    phase = Phase()
    t0 = time.perf_counter()
    for response in client.score_stream(requests(), timeout=timeout):
        phase.latencies.append(time.perf_counter() - sent[response.request_id])
        _count(response, phase)
        slots.release()
    phase.seconds = time.perf_counter() - t0
    return phase


def drive_unary(client: TeacherClient, texts: list[list[str]], top_k: int, concurrency: int,
                timeout: float) -> Phase:
    """Unary Score calls from ``concurrency`` threads."""
    work: queue.Queue[list[str]] = queue.Queue()
    for batch in texts:
        work.put(batch)
    phase, lock = Phase(), threading.Lock()

    def worker() -> None:
        while True:
            try:
                batch = work.get_nowait()
            except queue.Empty:
                return
            t1 = time.perf_counter()
            response = client.stub.Score(client.request(batch, top_k), timeout=timeout)
            with lock:
                phase.latencies.append(time.perf_counter() - t1)
                _count(response, phase)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.seconds = time.perf_counter() - t0
    return phase


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def start_server(cfg: TeacherConfig, args: argparse.Namespace) -> tuple[TeacherProcess, TeacherClient]:
    """Starts ``python -m teacher_server`` on 127.0.0.1:0 and waits until it reports SERVING."""
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    server = TeacherProcess(cfg.model, *server_flags(cfg), startup_timeout=args.ready_timeout, env=env).start()
    return server, TeacherClient(server.address, timeout=args.ready_timeout)


def run_server(server: TeacherProcess, client: TeacherClient, texts: list[list[str]],
               args: argparse.Namespace) -> Phase:
    """Times ``texts`` (one request each) through the server; CPU = server process + this client."""
    drive = drive_stream if args.transport == "stream" else drive_unary
    server_cpu, client_cpu = cpu_seconds(server.proc.pid), time.process_time()
    phase = drive(client, texts, args.top_k, args.concurrency, args.ready_timeout)
    phase.server_cpu = cpu_seconds(server.proc.pid) - server_cpu
    phase.cpu = phase.server_cpu + time.process_time() - client_cpu
    return phase


# ---------------------------------------------------------------- main


def teacher_config(args: argparse.Namespace, model_dir: Path, width: int) -> TeacherConfig:
    """One config for both sides; a server forward holds exactly ``--batch-texts`` texts, as the raw loop."""
    batch_tokens = args.batch_texts * width
    return TeacherConfig(model=str(model_dir), device=args.device, dtype=args.dtype, compile=args.compile,
                         max_batch_tokens=batch_tokens, max_batch_texts=args.batch_texts,
                         max_tokens_per_text=width, max_tokens_per_request=max(262144, batch_tokens),
                         max_queue_tokens=max(1 << 20, batch_tokens * (args.concurrency + 1)),
                         pad_to_multiple_of=args.pad_to_multiple_of, default_top_k=args.top_k,
                         max_top_k=max(64, args.top_k), warmup=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="an existing model folder (model + tokenizer.json)")
    src.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                     help="random-weight Llama of this shape with the Llama-2 tokenizer, built in a temp dir "
                          "(default: tiny = hidden 512, 4 layers; llama-7b and tinyllama-1.1b are for GPUs)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward on both sides")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per text (default: 2048 on GPU, 512 on CPU)")
    p.add_argument("--batch-texts", type=int, default=None,
                   help="texts per request and per forward pass (default: 8 on GPU, 4 on CPU)")
    p.add_argument("--top-k", type=int, default=10, help="top-k kept per position (default: 10)")
    p.add_argument("--requests", type=int, default=8,
                   help="timed requests (= timed raw batches) per round (default: 8)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches/requests first, on each side (default: 3)")
    p.add_argument("--rounds", type=int, default=3,
                   help="raw and server phases alternate this many times, each of --requests (default: 3)")
    p.add_argument("--concurrency", type=int, default=2, help="server requests in flight (default: 2)")
    p.add_argument("--transport", choices=("stream", "unary"), default="stream",
                   help="ScoreStream with --concurrency in flight, or unary Score from that many threads")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the raw loop and the server (OMP_NUM_THREADS); default: all cores")
    p.add_argument("--pad-to-multiple-of", type=int, default=1,
                   help="pad batch length to a multiple of this on both sides (use 64 with --compile)")
    p.add_argument("--ready-timeout", type=float, default=1200.0,
                   help="seconds to wait for the server to load/compile, and the per-request deadline")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.seq_len = args.seq_len or (2048 if on_gpu else 512)
    args.batch_texts = args.batch_texts or (8 if on_gpu else 4)
    args.threads = args.threads or (os.cpu_count() or 1)
    return args


def _total(phases: list[Phase]) -> Phase:
    total = Phase()
    for p in phases:
        total.tokens, total.seconds, total.cpu = total.tokens + p.tokens, total.seconds + p.seconds, total.cpu + p.cpu
        total.server_cpu += p.server_cpu
        total.array_bytes, total.message_bytes = total.array_bytes + p.array_bytes, total.message_bytes + p.message_bytes
        total.latencies += p.latencies
    return total


def summarise(args: argparse.Namespace, raws: list[Phase], servers: list[Phase]) -> dict:
    raw, server = _total(raws), _total(servers)
    return {
        "raw_tokens_per_s": round(raw.tokens_per_s, 1),
        "server_tokens_per_s": round(server.tokens_per_s, 1),
        "ratio": round(server.tokens_per_s / raw.tokens_per_s, 3),
        "round_ratios": [round(s.tokens_per_s / r.tokens_per_s, 3) for r, s in zip(raws, servers, strict=True)],
        "median_round_ratio": round(float(np.median([s.tokens_per_s / r.tokens_per_s
                                                      for r, s in zip(raws, servers, strict=True)])), 3),
        "raw_tokens_per_cpu_s": round(raw.tokens / raw.cpu, 1),
        "server_tokens_per_cpu_s": round(server.tokens / server.cpu, 1),
        "server_process_cpu_share": round(server.server_cpu / server.cpu, 3),
        "array_bytes_per_token": round(server.array_bytes / server.tokens, 2),
        "message_bytes_per_token": round(server.message_bytes / server.tokens, 2),
        "target_bytes_per_token": 6 * args.top_k + 12,
        "raw_batch_s_median": round(float(np.median(raw.latencies)), 3),
        "server_request_s_median": round(float(np.median(server.latencies)), 3),
        "tokens_timed": {"raw": raw.tokens, "server": server.tokens},
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "torch": torch.__version__,
        "loadavg_1min_before_after": [round(x, 2) for x in args.loadavg],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def report(args: argparse.Namespace, cfg: TeacherConfig, summary: dict) -> None:
    """Prints the side-by-side table and the summary as one JSON line."""
    s = summary
    print(f"\nteacher throughput: {cfg.device}/{cfg.dtype} compile={cfg.compile} seq={args.seq_len} "
          f"batch={args.batch_texts} k={args.top_k} requests={args.requests}x{args.rounds} rounds "
          f"concurrency={args.concurrency} transport={args.transport} threads={args.threads}")
    print(f"  raw    {s['raw_tokens_per_s']:12.1f} tok/s   {s['raw_tokens_per_cpu_s']:10.1f} tok/CPU-s")
    print(f"  server {s['server_tokens_per_s']:12.1f} tok/s   {s['server_tokens_per_cpu_s']:10.1f} tok/CPU-s "
          f"(server process {100 * s['server_process_cpu_share']:.0f}% of that CPU)")
    print(f"  ratio  {s['ratio']:12.3f}         (server / raw; median of rounds {s['median_round_ratio']}, "
          f"rounds {s['round_ratios']})")
    print(f"  wire   {s['array_bytes_per_token']:.1f} B/token in arrays, "
          f"{s['message_bytes_per_token']:.1f} B/token per message; target <= {s['target_bytes_per_token']} (6k+12)")
    print(f"  load   1-min load average {s['loadavg_1min_before_after']} (before, after): other work on the "
          "machine shows here")
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))


def prepare(args: argparse.Namespace, model_dir: Path):
    """Loads the raw backend and cuts the texts; returns backend, texts per request, id batches, config."""
    probe = TeacherConfig(model=str(model_dir), device=args.device, dtype=args.dtype, compile=args.compile)
    backend, tokenizer = load_hf(probe)
    n = max(args.warmup, args.requests)
    pieces = make_texts(tokenizer, args.seq_len, n * args.batch_texts)
    texts = [pieces[i * args.batch_texts:(i + 1) * args.batch_texts] for i in range(n)]
    batches = [[e.ids for e in tokenizer.encode(t)] for t in texts]
    width = max(len(ids) for b in batches for ids in b)
    width = -(-width // args.pad_to_multiple_of) * args.pad_to_multiple_of
    cfg = teacher_config(args, model_dir, width)
    backend.pad_to_multiple_of = cfg.pad_to_multiple_of
    return backend, texts, batches, cfg


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="teacher-bench-") as tmp:
        model_dir = args.model or build_shape(args.shape, Path(tmp), args.device, args.dtype)
        backend, texts, batches, cfg = prepare(args, Path(model_dir))
        run_raw(backend, batches[:args.warmup], args.top_k, args.warmup)
        server, client = start_server(cfg, args)
        raws, servers, load0 = [], [], os.getloadavg()[0]
        try:
            run_server(server, client, texts[:args.warmup], args)
            for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both sides alike
                raws.append(run_raw(backend, batches[:args.requests], args.top_k, 0))
                servers.append(run_server(server, client, texts[:args.requests], args))
        finally:
            client.close()
            server.stop()
    args.loadavg = [load0, os.getloadavg()[0]]
    summary = summarise(args, raws, servers)
    report(args, cfg, summary)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
