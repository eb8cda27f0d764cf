"""Alignment throughput: fast ``mined`` and ``offsets`` vs the plain O(n·m) DTW, side by side in one run.

    python bench/alignment.py                 # 2048-token sequences, three real tokenizer pairs
    python bench/alignment.py --tokens 8192 --no-plain --repeats 3

Each pair aligns the same 2048-token target windows of real text (standard-library code and its
docstrings) with random teacher top-k (alignment cost does not depend on the values). All timed work
is single-threaded (``cdist(workers=1)``, numpy), so tokens/s is per core. The plain DTW is the
paper's: one edit-distance call per cell in Python, then the same backtrack; it is timed once per pair
(skip it with ``--no-plain``, e.g. for 8192 tokens) and its path is checked against the fast one.
"certified / band" is the price of exactness: the certified DTW (``dtw.exact_banded_path``) against one
unchecked pass of the banded DTW at half-width 64 (what the aligner did before issue 12; the same
compiled kernel with the bound switched off), same window.

The trainer's own terms: a micro-batch of 8 sequences × 3 sources (MPT, GPT-2 and Mistral teachers of a
Llama-2-tokenizer student) aligned with ``ALIGNERS["mined"]`` on threads, one micro-batch per thread as
the trainer's prefetch workers do, on 1 thread and on as many threads as cores: milliseconds per
micro-batch and the cores it keeps busy (process CPU time / wall time). The DTW's kernels and rapidfuzz's
cdist release the GIL, so that part runs in parallel where the machine has the cores; the line ends with
its share of the aligner's time (the rest is numpy and Python around it). "certified / band"
alternates the two calls, so that a load change on a shared machine hits both.
Also times the 32k × 50k MinED vocab map build (``workers=-1``: all cores).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")


from student_trainer.core import dtw  # noqa: E402
from student_trainer.core.alignment import (  # noqa: E402
    ALIGNERS,
    TeacherOutput,
    Tokens,
    VocabPair,
    coded_ids,
    dtw_path,
    lookup,
    make_vocab_pair,
)
from student_trainer.core.vocab import build_vocab_map  # noqa: E402
from student_trainer.demo.assets import named_tokenizer  # noqa: E402
from tests.student_trainer.core.reference_dtw import plain_dtw  # noqa: E402  (the tests' plain DTW)

PAIRS = [("mpt", "llama-spm"), ("gpt-2", "llama-spm"), ("mistral-spm", "gpt-2")]
STUDENT, TEACHERS, MICRO_BATCH = "llama-spm", ("mpt", "gpt-2", "mistral-spm"), 8  # the trainer-terms row
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def texts() -> dict[str, str]:
    """Code (argparse.py) and prose (docstrings of a few modules), each long enough for 2048 tokens."""
    code = (STDLIB / "argparse.py").read_text(encoding="utf-8")[4_000:60_000]
    docs = []
    for name in ("textwrap.py", "difflib.py", "heapq.py", "fractions.py", "argparse.py", "typing.py"):
        for node in ast.walk(ast.parse((STDLIB / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and ast.get_docstring(node):
                docs.append(ast.get_docstring(node) or "")
    return {"code": code, "prose": "\n\n".join(docs)[:60_000]}


def encode(tok, text: str) -> Tokens:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return Tokens(np.asarray(enc["input_ids"], np.int64), np.asarray(enc["offset_mapping"], np.int64))


def window(target: Tokens, source: Tokens, start: int, length: int) -> tuple[Tokens, TeacherOutput]:
    """``length`` target tokens from ``start`` and the source tokens covering the same chars."""
    t = Tokens(target.ids[start:start + length], target.offsets[start:start + length])
    lo, hi = t.offsets[0, 0], t.offsets[-1, 1]
    keep = (source.offsets[:, 0] >= lo) & (source.offsets[:, 1] <= hi)
    s = Tokens(source.ids[keep], source.offsets[keep])
    rng = np.random.default_rng(start)
    n, k = len(s.ids), 10
    ids = rng.integers(0, 32_000, (n, k))
    lp = np.sort(np.log(rng.dirichlet(np.ones(4 * k), n)[:, :k]), axis=1)[:, ::-1].astype(np.float32)
    return t, TeacherOutput(s, ids, lp, lp[1:, 0].copy())




def unchecked_band(src: np.ndarray, tgt: np.ndarray, target: Tokens, source: Tokens, half: int = 64) -> None:
    """One pass of the banded DTW without the certificate (the aligner before issue 12, minus its retries):
    the same costs, kernel and backtrack as the certified path, the bound switched off."""
    lo = dtw.band_starts(target.offsets[:, 0], source.offsets[:, 0], half)
    width = min(len(tgt), 2 * half + 1)
    dist, inv_s, inv_t = dtw.pair_costs(dtw.coded(src), dtw.coded(tgt))
    dtw.dtw_backtrack(dtw.banded_dtw(dist, inv_s, inv_t, lo, width, None)[0], lo, len(tgt))


def best_of(repeats: int, fn, *args) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def ratio_of(repeats: int, fn, baseline, *args) -> float:
    """Best time of ``fn`` over best time of ``baseline``, the two alternating (a load change on a shared
    machine then hits both)."""
    pairs = [(best_of(1, fn, *args), best_of(1, baseline, *args)) for _ in range(max(repeats, 5))]
    return min(a for a, _ in pairs) / min(b for _, b in pairs)


def tokens_per_s(aligner, target: Tokens, teacher: TeacherOutput, pair: VocabPair, repeats: int) -> float:
    """Target tokens per second of one aligner, best of ``repeats`` after one untimed call (numba loads or
    compiles its kernels on the first call of a process: 0.3 s from its cache, ~10 s without)."""
    aligner(target, teacher, pair)
    return len(target.ids) / best_of(repeats, aligner, target, teacher, pair)


def bench_pair(source: str, target: str, pair: VocabPair, corpus: dict[str, str], length: int,
               repeats: int, plain: bool) -> None:
    s_tok, t_tok = named_tokenizer(source), named_tokenizer(target)
    for kind, text in corpus.items():
        tgt_all, src_all = encode(t_tok, text), encode(s_tok, text)
        tgt, teacher = window(tgt_all, src_all, 64, length)
        n = len(tgt.ids)
        rate = {name: tokens_per_s(aligner, tgt, teacher, pair, repeats) for name, aligner in ALIGNERS.items()}
        share = {name: aligner(tgt, teacher, pair).aligned[:-1].mean() for name, aligner in ALIGNERS.items()}
        s_str = lookup(pair.source_stripped, teacher.tokens.ids, "")
        t_str = lookup(pair.target_stripped, tgt.ids, "")
        price = ratio_of(2 * repeats, dtw_path, unchecked_band, s_str, t_str, tgt, teacher.tokens)
        line = (f"{source:>11} -> {target:<9} {kind:<5} T={n} S={len(teacher.tokens.ids)}  "
                f"mined {rate['mined']:>9,.0f} tok/s  offsets {rate['offsets']:>10,.0f} tok/s  "
                f"certified / band {price:.2f}x  aligned: mined {share['mined']:.1%} offsets {share['offsets']:.1%}")
        if kind == "code" and plain:
            t0 = time.perf_counter()
            ref = plain_dtw(list(s_str), list(t_str))
            elapsed = time.perf_counter() - t0
            fast = dtw_path(s_str, t_str, tgt, teacher.tokens)
            same = all(np.array_equal(a, b) for a, b in zip(fast, ref, strict=True))
            line += (f"\n{'':>26}plain DTW {n / elapsed:,.0f} tok/s ({elapsed:.2f} s)  mined/plain "
                     f"{rate['mined'] * elapsed / n:,.0f}x  same path: {same}")
        print(line, flush=True)


Sequence = list[tuple[Tokens, TeacherOutput, VocabPair]]  # one target window, every teacher's outputs


def micro_batch(corpus: dict[str, str], pairs: dict[str, VocabPair], length: int) -> list[Sequence]:
    """``MICRO_BATCH`` student windows of ``length`` tokens (code and prose alternating, spread over each
    text), each with every teacher's outputs over the same characters."""
    encoded = {(name, kind): encode(named_tokenizer(name), text)
               for name in (STUDENT, *pairs) for kind, text in corpus.items()}
    batch: list[Sequence] = []
    for i in range(MICRO_BATCH):
        kind = list(corpus)[i % len(corpus)]
        tgt_all = encoded[STUDENT, kind]
        start = 64 + (i // len(corpus)) * max(len(tgt_all.ids) - length - 64, 0) // (MICRO_BATCH // len(corpus))
        batch.append([(*window(tgt_all, encoded[name, kind], start, length), pairs[name]) for name in pairs])
    return batch


def align_micro_batch(batch: list[Sequence]) -> None:
    """What one prefetch worker does for a micro-batch's alignment: every sequence, every source."""
    for sequence in batch:
        for target, teacher, pair in sequence:
            ALIGNERS["mined"](target, teacher, pair)


def on_threads(batch: list[Sequence], threads: int, rounds: int) -> tuple[float, float]:
    """Wall seconds per micro-batch and cores busy (process CPU / wall) aligning ``threads * rounds``
    micro-batches, ``threads`` at a time."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(align_micro_batch, [batch] * threads))  # warm the threads
        t0, c0 = time.perf_counter(), time.process_time()
        list(pool.map(align_micro_batch, [batch] * (threads * rounds)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall / (threads * rounds), cpu / wall


def gil_free_share(batch: list[Sequence]) -> float:
    """Share of the aligner's time spent in rapidfuzz's cdist and the DTW's numba kernels, which release the
    GIL, timed alone on the same sequences. The rest is numpy (which releases it in some loops too) and
    Python."""
    free = total = 0.0
    for sequence in batch:
        for target, teacher, pair in sequence:
            src = coded_ids(pair.source_stripped, teacher.tokens.ids)
            tgt = coded_ids(pair.target_stripped, target.ids)
            pairs = [(best_of(1, dtw_kernels, src, tgt, target, teacher.tokens),
                      best_of(1, ALIGNERS["mined"], target, teacher, pair)) for _ in range(5)]  # alternating
            free, total = free + min(a for a, _ in pairs), total + min(b for _, b in pairs)
    return free / total


def dtw_kernels(src: dtw.Coded, tgt: dtw.Coded, target: Tokens, source: Tokens) -> None:
    """What ``mined`` runs without the GIL: cdist, the side floors, the certified band pass, the backtrack."""
    n_t, half = len(target.ids), max(dtw.DTW_HALF_BAND, len(target.ids) // dtw.DTW_BAND_SHARE)
    lo, width = dtw.band_starts(target.offsets[:, 0], source.offsets[:, 0], half), min(n_t, 2 * half + 1)
    dist, inv_s, inv_t = dtw.pair_costs(src, tgt)
    acc, _ = dtw.banded_dtw(dist, inv_s, inv_t, lo, width, dtw.side_floors(dist, inv_s, inv_t, lo, width))
    dtw.dtw_backtrack(acc, lo, n_t)


def bench_trainer_terms(corpus: dict[str, str], pairs: dict[str, VocabPair], length: int, repeats: int) -> None:
    batch = micro_batch(corpus, pairs, length)
    tokens = sum(len(seq[0][0].ids) for seq in batch)
    cores = os.cpu_count() or 1
    runs = {threads: min(on_threads(batch, threads, 2) for _ in range(repeats)) for threads in sorted({1, cores})}
    (one, one_busy), (many, many_busy) = runs[1], runs[cores]
    print(f"trainer terms: {len(pairs)} sources x micro-batch of {MICRO_BATCH} x {length} tokens "
          f"({tokens} student tokens, teachers {', '.join(pairs)} -> {STUDENT}):\n"
          f"{'':>26}1 thread {one * 1e3:,.0f} ms/micro-batch ({one_busy:.2f} cores busy, "
          f"{one * one_busy * 1e3:,.0f} CPU-ms); {cores} threads {many * 1e3:,.0f} ms/micro-batch "
          f"({many_busy:.2f} cores busy, {many * many_busy * 1e3:,.0f} CPU-ms); "
          f"parallel speed-up {one / many:.2f}x, load average {os.getloadavg()[0]:.2f}; "
          f"the DTW's kernels (GIL released) take {gil_free_share(batch):.0%} of the aligner's time", flush=True)


def _pair(item: str) -> tuple[str, str]:
    source, sep, target = item.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{item!r} is not SOURCE:TARGET (e.g. mpt:llama-spm)")
    return source, target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="target tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (best is kept)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain O(n·m) DTW (slow past 4k tokens)")
    parser.add_argument("--pairs", nargs="+", type=_pair, default=PAIRS, metavar="SOURCE:TARGET",
                        help=f"tokenizer pairs to time (default: {' '.join(f'{a}:{b}' for a, b in PAIRS)})")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS),
                        help=f"sources of the trainer-terms row (default: {' '.join(TEACHERS)})")
    parser.add_argument("--skip-map-timing", action="store_true",
                        help="skip timing the 32k x 50k vocabulary map build (the pairs' maps are still built)")
    args = parser.parse_args()
    corpus = texts()
    print(f"{os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    vocabs = {name: (lambda t: t.convert_ids_to_tokens(list(range(len(t)))))(named_tokenizer(name))
              for name in {n for p in args.pairs for n in p} | {STUDENT, *args.teachers, "llama-spm", "mpt"}}
    if not args.skip_map_timing:
        t0 = time.perf_counter()
        build_vocab_map(vocabs["llama-spm"], vocabs["mpt"])
        print(f"vocab map llama-spm (32k) -> mpt (50k): {time.perf_counter() - t0:.1f} s on {os.cpu_count()} cores")
    pairs = {}
    for source, target in args.pairs + [(name, STUDENT) for name in args.teachers]:
        if (source, target) in pairs:
            continue
        t0 = time.perf_counter()
        vmap = build_vocab_map(vocabs[source], vocabs[target])
        t1 = time.perf_counter()
        pairs[source, target] = make_vocab_pair(vocabs[source], vocabs[target], vmap)
        print(f"vocab map {source} ({len(vocabs[source])}) -> {target} ({len(vocabs[target])}): "
              f"{t1 - t0:.1f} s, + canonical strings {time.perf_counter() - t1:.1f} s")
        if (source, target) in args.pairs:
            bench_pair(source, target, pairs[source, target], corpus, args.tokens, args.repeats, not args.no_plain)
    bench_trainer_terms(corpus, {name: pairs[name, STUDENT] for name in args.teachers}, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
