"""Teacher under load: N clients x T seconds of mixed requests against one real teacher process (issue 11).

    .venv/bin/python bench/load.py --clients 32 --seconds 60                  # closed loop, mixed requests
    .venv/bin/python bench/load.py --overload 2 --seconds 60 --deadline 10    # open loop at 2x capacity:
                                                                              # early refusal off, then on

Closed loop: each client sends its next request when the previous one is answered. Requests mix 1-4 texts
of real text (standard-library code and prose) of ~16-700 tokens, top_k 1-64, fp16 and fp32, and one in
five goes over ScoreStream. Reported: requests ok, errors by status code, p50/p99 latency of the successful
ones, tokens/s, the teacher's RSS (psutil) before and after. Then a sample of the answers is re-scored
alone on the idle teacher: ids must be identical and log-probs within one fp16 step (the batch a text
shared can move the last bit; ties may reorder).

Unread (``--unread N``): N requests of 4 x ~250 tokens at k = 64 in fp32 (~0.4 MB per response) sent on
one ScoreStream that is never read, to a teacher with the default flow control and to one with it
effectively off (``--stream-max-pending`` 10^6); the teacher's RSS once it is idle again, side by side.

Overload: the teacher's capacity (requests/s of one fixed shape) is measured closed loop first; then
requests of that shape arrive open loop (Poisson) at ``--overload`` x capacity, each with ``--deadline``,
against a teacher with ``--no-early-refusal`` and then one with early refusal, side by side in one run:
p50/p99 of the successful requests, refusal rate, deadline-exceeded rate and goodput for each.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protos import teacher_pb2 as pb  # noqa: E402
from protos.scores import TeacherScores, decode_scores  # noqa: E402
from student_trainer.demo.assets import build_tiny_model  # noqa: E402
from student_trainer.demo.teacher_process import TeacherProcess  # noqa: E402
from student_trainer.trainer.client import TeacherClient  # noqa: E402

CORPUS = ("argparse.py", "textwrap.py", "difflib.py", "heapq.py")


@dataclass
class Tally:
    """What one run saw; thread-safe."""

    latencies: list[float] = field(default_factory=list)
    codes: collections.Counter = field(default_factory=collections.Counter)
    tokens: int = 0
    samples: list[tuple[pb.ScoreRequest, pb.ScoreResponse]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, seconds: float, response: pb.ScoreResponse, request: pb.ScoreRequest, keep: bool) -> None:
        tokens = sum(r.input_ids.shape[0] for r in response.results)
        with self.lock:
            self.latencies.append(seconds)
            self.codes["OK"] += 1
            self.tokens += tokens
            if keep:
                self.samples.append((request, response))

    def failed(self, code: grpc.StatusCode) -> None:
        with self.lock:
            self.codes[code.name] += 1


def corpus() -> str:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((stdlib / name).read_text(encoding="utf-8") for name in CORPUS)


def mixed_request(rng: np.random.Generator, text: str, request_id: str) -> pb.ScoreRequest:
    texts = []
    for _ in range(int(rng.integers(1, 5))):
        chars = int(rng.integers(64, 2800))  # ~16-700 tokens of code or prose
        start = int(rng.integers(0, len(text) - chars))
        texts.append(text[start:start + chars])
    return pb.ScoreRequest(texts=texts, top_k=int(rng.choice([1, 5, 10, 32, 64])), truncate=True,
                           logprob_format=int(rng.choice([pb.LOGPROB_FORMAT_FLOAT16, pb.LOGPROB_FORMAT_FLOAT32])),
                           request_id=request_id)


def closed_loop_client(address: str, seed: int, until: float, deadline: float, tally: Tally) -> None:
    rng, text = np.random.default_rng(seed), corpus()
    with TeacherClient(address, timeout=deadline, max_attempts=1) as client:
        i = 0
        while time.monotonic() < until:
            request = mixed_request(rng, text, f"{seed}-{i}")
            keep, i = i == 0 or rng.random() < 0.1, i + 1
            t0 = time.perf_counter()
            try:
                if rng.random() < 0.2:
                    (response,) = client.stub.ScoreStream(iter([request]), timeout=deadline)
                    if response.HasField("error"):
                        tally.failed(_STATUS[response.error.code])
                        continue
                else:
                    response = client.stub.Score(request, timeout=deadline)
            except grpc.RpcError as err:
                tally.failed(err.code())
                continue
            tally.ok(time.perf_counter() - t0, response, request, keep)


_STATUS = {c.value[0]: c for c in grpc.StatusCode}


def run_closed_loop(address: str, clients: int, seconds: float, deadline: float) -> tuple[Tally, float]:
    tally, until = Tally(), time.monotonic() + seconds
    threads = [threading.Thread(target=closed_loop_client, args=(address, 1000 + c, until, deadline, tally))
               for c in range(clients)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally, time.perf_counter() - t0


def within_one_fp16_step(a: TeacherScores, b: TeacherScores) -> bool:
    """Same ids; log-probs within one fp16 step; top-k ids may differ only where values tie."""
    if not np.array_equal(a.input_ids, b.input_ids):
        return False
    va, vb = a.topk_logprobs.astype(np.float32), b.topk_logprobs.astype(np.float32)
    step = np.spacing(np.abs(va).astype(np.float16)).astype(np.float32) + 1e-6
    nxt_step = np.spacing(np.abs(a.next_logprobs).astype(np.float16)).astype(np.float32) + 1e-6
    if np.any(np.abs(va - vb) > step) or np.any(np.abs(a.next_logprobs - b.next_logprobs) > nxt_step):
        return False
    differ = a.topk_ids != b.topk_ids
    ties = np.zeros_like(differ)  # a differing id is fine where its value ties with a neighbour's
    ties[:, 1:] |= np.abs(va[:, 1:] - va[:, :-1]) <= step[:, 1:]
    ties[:, :-1] |= np.abs(va[:, :-1] - va[:, 1:]) <= step[:, :-1]
    return bool(np.all(ties[differ]))


def rescore_alone(address: str, samples: list[tuple[pb.ScoreRequest, pb.ScoreResponse]]) -> tuple[int, int]:
    """(texts checked, texts that do not match) for each sampled request re-sent alone to the idle teacher."""
    checked = bad = 0
    with TeacherClient(address, timeout=120, max_attempts=1) as client:
        for request, response in samples:
            again = client.stub.Score(request, timeout=120)
            for first, second in zip(response.results, again.results, strict=True):
                checked += 1
                bad += not within_one_fp16_step(decode_scores(first), decode_scores(second))
    return checked, bad


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def fixed_request(text: str, i: int) -> pb.ScoreRequest:
    """The overload runs' one shape: 2 texts of ~256 tokens, top_k 10, fp16."""
    start = (i * 997) % (len(text) - 2200)
    return pb.ScoreRequest(texts=[text[start:start + 1000], text[start + 1100:start + 2100]], top_k=10,
                           truncate=True, request_id=str(i))


def capacity(address: str, seconds: float, clients: int = 8) -> float:
    """Requests/s of the fixed shape the teacher sustains (closed loop, enough clients to keep it busy)."""
    text, done, until = corpus(), [0], time.monotonic() + seconds
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        with TeacherClient(address, timeout=120, max_attempts=1) as client:
            i = c
            while time.monotonic() < until:
                client.stub.Score(fixed_request(text, i), timeout=120)
                i += clients
                with lock:
                    done[0] += 1

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.perf_counter() - t0)


def open_loop(address: str, rate: float, seconds: float, deadline: float, seed: int) -> tuple[Tally, float, int]:
    """Poisson arrivals at ``rate``/s for ``seconds``, each with ``deadline``; returns (tally, wall s, sent)."""
    rng, text, tally = np.random.default_rng(seed), corpus(), Tally()
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)])
    score = channel.unary_unary("/livefuse.v1.Teacher/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                                response_deserializer=pb.ScoreResponse.FromString)
    futures, t0 = [], time.perf_counter()
    next_at = 0.0
    while next_at < seconds:
        time.sleep(max(0.0, next_at - (time.perf_counter() - t0)))
        request, sent_at = fixed_request(text, len(futures)), time.perf_counter()
        future = score.future(request, timeout=deadline)
        future.add_done_callback(lambda f, s=sent_at, r=request: _record(f, s, r, tally))
        futures.append(future)
        next_at += float(rng.exponential(1.0 / rate))
    for future in futures:
        with contextlib.suppress(grpc.RpcError):
            future.result()
    wall = time.perf_counter() - t0
    channel.close()
    return tally, wall, len(futures)


def _record(future: grpc.Future, sent_at: float, request: pb.ScoreRequest, tally: Tally) -> None:
    try:
        response = future.result()
    except grpc.RpcError as err:
        tally.failed(err.code())
        return
    tally.ok(time.perf_counter() - sent_at, response, request, keep=False)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, load average {load}")


def summary(name: str, tally: Tally, wall: float, sent: int | None = None) -> str:
    total = sent if sent is not None else sum(tally.codes.values())
    errors = ", ".join(f"{code} {n}" for code, n in sorted(tally.codes.items()) if code != "OK") or "none"
    return (f"| {name} | {total} | {tally.codes['OK']} | {errors} | {percentile(tally.latencies, 50):.2f} | "
            f"{percentile(tally.latencies, 99):.2f} | {tally.tokens / wall:,.0f} |")


HEADER = ("| run | requests | ok | errors by code | p50 s | p99 s | tokens/s |\n"
          "| --- | ---: | ---: | --- | ---: | ---: | ---: |")
OVERLOAD_HEADER = ("| run | requests | ok | errors by code | p50 s (ok) | p99 s (ok) | tokens/s | refused | "
                   "deadline exceeded | ok/s |\n| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")


def closed_loop_report(model: Path, args: argparse.Namespace) -> None:
    with TeacherProcess(model, "--device", "cpu", "--max-tokens-per-text", "1024") as teacher:
        assert teacher.proc is not None
        before = rss_mb(teacher.proc.pid)
        print(f"[load] {args.clients} clients x {args.seconds:.0f} s against {teacher.address}", file=sys.stderr)
        tally, wall = run_closed_loop(teacher.address, args.clients, args.seconds, args.deadline)
        after = rss_mb(teacher.proc.pid)
        time.sleep(5)
        idle = rss_mb(teacher.proc.pid)
        checked, bad = rescore_alone(teacher.address, tally.samples)
    print(HEADER)
    print(summary(f"{args.clients} clients x {args.seconds:.0f} s, closed loop", tally, wall))
    print(f"\nteacher RSS: {before:.0f} MB before, {after:.0f} MB after the load, {idle:.0f} MB 5 s later")
    print(f"re-scored alone: {checked} texts of {len(tally.samples)} sampled requests, {bad} not within one fp16 step")


def overload_report(model: Path, args: argparse.Namespace) -> None:
    rows, rate = [], None
    for name, flag in (("early refusal off", "--no-early-refusal"), ("early refusal on", "--early-refusal")):
        with TeacherProcess(model, "--device", "cpu", "--max-tokens-per-text", "1024", flag) as teacher:
            if rate is None:
                rate = capacity(teacher.address, args.capacity_seconds)
                print(f"[load] capacity {rate:.2f} requests/s; offering {args.overload * rate:.2f}/s", file=sys.stderr)
            else:  # the same warm-up: the rate the second teacher measures starts from real forwards too
                capacity(teacher.address, 5)
            tally, wall, sent = open_loop(teacher.address, args.overload * rate, args.seconds, args.deadline, seed=7)
        refused = tally.codes["UNAVAILABLE"] / sent
        late = tally.codes["DEADLINE_EXCEEDED"] / sent
        rows.append(summary(name, tally, wall, sent) + f" {refused:.0%} | {late:.0%} | {tally.codes['OK'] / wall:.2f} |")
    print(f"capacity: {rate:.2f} requests/s (2 texts x ~256 tokens, k = 10); offered {args.overload:g} x capacity, "
          f"deadline {args.deadline:g} s, {args.seconds:.0f} s")
    print(OVERLOAD_HEADER)
    print("\n".join(rows))


def unread_report(model: Path, args: argparse.Namespace) -> None:
    """Teacher RSS held by a stream whose client never reads, flow control on (default) vs off."""
    text = "Words that the tokenizer cuts into about two hundred and fifty tokens. " * 18
    requests = [pb.ScoreRequest(texts=[text] * 4, top_k=64, logprob_format=pb.LOGPROB_FORMAT_FLOAT32, truncate=True,
                                request_id=str(i)) for i in range(args.unread)]
    small_forwards = ("--logprob-chunk-tokens", "64", "--max-batch-tokens", "1024", "--max-tokens-per-text", "1024")
    print("| stream flow control | unread requests | teacher RSS held when idle | seconds |\n| --- | ---: | ---: | ---: |")
    for name, pending in (("on (stream_max_pending 32)", "32"), ("off (stream_max_pending 10^6)", "1000000")):
        with TeacherProcess(model, "--device", "cpu", "--stream-max-pending", pending, *small_forwards) as teacher, \
                grpc.insecure_channel(teacher.address, options=[("grpc.http2.bdp_probe", 0),
                                                                ("grpc.max_receive_message_length", 2**28)]) as channel:
            assert teacher.proc is not None
            process, stub = psutil.Process(teacher.proc.pid), channel.stream_stream(
                "/livefuse.v1.Teacher/ScoreStream", request_serializer=pb.ScoreRequest.SerializeToString,
                response_deserializer=pb.ScoreResponse.FromString)
            for _ in stub(iter(requests[:8]), timeout=600):
                pass  # the allocator has seen full forwards before the measurement
            before, t0 = process.memory_info().rss, time.perf_counter()
            call = stub(iter(requests), timeout=3600)
            last, since = -1.0, time.monotonic()
            while time.monotonic() - since < 5:  # until the teacher has used no CPU for 5 s
                cpu = sum(process.cpu_times()[:2])
                last, since = (cpu, time.monotonic()) if cpu - last > 0.1 else (last, since)
                time.sleep(0.5)
            held = (process.memory_info().rss - before) / 2**20
            call.cancel()
        print(f"| {name} | {len(requests)} | {held:+.1f} MB | {time.perf_counter() - t0:.0f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients (default: 32)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each load run (default: 60)")
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="deadline of each request in seconds (default: 120, the trainer's timeout_s)")
    parser.add_argument("--overload", type=float, default=None,
                        help="instead of the closed loop: offer this multiple of the measured capacity, open loop, "
                             "early refusal off then on (e.g. 2)")
    parser.add_argument("--unread", type=int, default=None,
                        help="instead of the closed loop: send this many requests on a ScoreStream never read, flow "
                             "control on vs off, and report the teacher's RSS (e.g. 200)")
    parser.add_argument("--capacity-seconds", type=float, default=20.0,
                        help="how long the capacity is measured before an overload run (default: 20)")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model("gpt2" if args.unread else "llama", "gpt-2" if args.unread else "llama-spm",
                                 Path(tmp) / "teacher", seed=0)
        if args.unread:
            unread_report(model, args)
        elif args.overload:
            overload_report(model, args)
        else:
            closed_loop_report(model, args)
    print(f"\nmachine at the end: {machine()}")


if __name__ == "__main__":
    main()
