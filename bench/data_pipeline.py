"""Trainer data at scale (issue 10): today's design (commit 29b6255: every rank reads and tokenizes the whole
corpus into Python blocks at start) vs the prepared cache, side by side on the same corpora.

    .venv/bin/python bench/data_pipeline.py --sizes 1e6 5e6 2e7 2e8              # all phases
    .venv/bin/python bench/data_pipeline.py --phases prepare --sizes 2e7          # one phase

Corpora (phase ``corpus``): deterministic jsonl files of at least N target tokens (``mistral-spm``, the
Llama-2-style 32k SentencePiece tokenizer) made of recombined standard-library ``.py`` files (each document a
seeded random slice of a random file, ~4k characters on average), under ``--workdir`` (not the repository).
Phases, each in fresh child processes:

- ``prepare``: the new ``prepare`` with 1 and 2 tokenizing processes (fresh cache) -> target tokens/s, cache
  bytes per token, the builder's peak RSS; the old ``read_documents`` + ``split_documents`` + ``make_blocks``
  (code of 29b6255, imported from a ``git archive`` of it) on the corpora up to ``--old-max`` tokens ->
  tokens/s and the RSS its blocks hold (above the process's RSS before reading).
- ``first-step``: ``livefuse-train`` (tiny Llama target with the mistral-spm tokenizer, CLM only, seq 512,
  micro batch 1) from process start to the first step in metrics.jsonl, warm cache; the old tree too (it
  tokenizes the corpus at every start) up to ``--old-max``.
- ``rss``: two CPU ranks under the ``deepspeed`` launcher (gloo) train 3 steps; each rank's peak RSS
  (``VmHWM``) and its anonymous / file-backed parts, sampled every 0.2 s; new on the smallest and largest
  corpus, old up to ``--old-max``.
Then the projection for MiniPile (1.8B tokens) x 8 ranks from the measured rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # livefuse itself comes from the venv's editable install, so that
# PYTHONPATH (the old tree) and a child's working directory decide which code a child runs
OLD_COMMIT = "29b6255"
TOKENIZER = "mistral-spm"
SEQ_LEN = 512  # the trainer's default; at 2048 a step's logits (32k vocabulary) swamp the RSS comparison
MINIPILE_TOKENS, RANKS = 1.8e9, 8


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process in bytes (from /proc)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


# --- corpora ----------------------------------------------------------------------------------------------------

def _stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if not {"site-packages", "dist-packages"} & set(p.parts)]
    return [t for t in (p.read_text(encoding="utf-8", errors="replace") for p in files) if len(t) > 500]


def _doc(texts: list[str], i: int) -> str:
    rng = np.random.default_rng([7, i])
    text = texts[int(rng.integers(len(texts)))]
    length = int(np.clip(rng.lognormal(7.8, 1.0), 200, 200_000))
    start = int(rng.integers(max(1, len(text) - length)))
    return text[start:start + length]


def corpus(workdir: Path, tokens: int) -> Path:
    """``stdlib-<tokens>.jsonl``: documents 0, 1, 2, ... until the estimated token count reaches ``tokens``."""
    path = workdir / f"stdlib-{tokens:.0e}.jsonl".replace("+", "")
    if path.exists():
        return path
    from student_trainer.demo.assets import named_tokenizer

    texts, tok = _stdlib_texts(), named_tokenizer(TOKENIZER)
    sample = [_doc(texts, i) for i in range(300)]
    chars_per_token = sum(map(len, sample)) / sum(len(x) for x in tok(sample, add_special_tokens=False)["input_ids"])
    want, chars, i = tokens * chars_per_token * 1.02, 0, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while chars < want:
            doc = _doc(texts, i)
            f.write(json.dumps({"text": doc}) + "\n")
            chars, i = chars + len(doc), i + 1
    tmp.rename(path)
    print(f"corpus {path.name}: {i:,} documents, {chars / 1e6:,.0f} M characters", flush=True)
    return path


# --- child processes --------------------------------------------------------------------------------------------

def child_new_prepare(path: str, cache: str, procs: int) -> dict:
    import datasets  # noqa: F401 - imported before the baseline, as the old design's child does through its data.py

    from student_trainer.demo.assets import named_tokenizer
    from student_trainer.trainer.config import DataConfig
    from student_trainer.trainer.data.prepared import prepare_corpus

    tok = named_tokenizer(TOKENIZER)
    d = DataConfig(train_files=[path], cache_dir=cache, seq_len=SEQ_LEN, num_proc=procs)
    base = _status()["VmRSS"]
    t0 = time.perf_counter()
    meta = prepare_corpus(d, tok, progress=False).meta
    seconds = time.perf_counter() - t0
    splits = meta.splits.values()
    return {"seconds": seconds, "tokens": sum(s.block_tokens for s in splits),
            "bytes": sum(n for s in splits for n in s.files.values()),
            "text_bytes": sum(s.files["text.bin"] for s in splits),
            "base_rss": base, "peak_rss": _status()["VmHWM"] - base,
            "workers_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def child_new_open(path: str, cache: str) -> dict:
    """The data part of a run's start on a warm cache (open, sampler, first micro-batch) and the memory it
    holds after 1,000 micro-batches of rank 0 of 2."""
    import datasets  # noqa: F401

    from student_trainer.demo.assets import named_tokenizer
    from student_trainer.trainer.config import DataConfig
    from student_trainer.trainer.data.blocks import BlockSampler
    from student_trainer.trainer.data.prepared import prepare_corpus

    tok = named_tokenizer(TOKENIZER)
    base = _status()
    t0 = time.perf_counter()
    blocks = prepare_corpus(DataConfig(train_files=[path], cache_dir=cache, seq_len=SEQ_LEN), tok, progress=False
                     ).blocks("train")
    sampler = BlockSampler(blocks, 1, 0, seed=0, rank=0, world=2)
    sampler.batch(0)
    seconds = time.perf_counter() - t0
    for m in range(1, 1000):
        sampler.batch(m)
    now = _status()
    return {"open_seconds": seconds, "blocks": len(blocks), "anon_growth": now["RssAnon"] - base["RssAnon"],
            "file_growth": now["RssFile"] - base["RssFile"]}


def child_old_blocks(path: str) -> dict:
    """The old ``_data``: every document read into memory, tokenized at once, one Python Block per block."""
    import datasets  # noqa: F401 - read_documents imports it on first use: not part of the blocks' cost

    # the old commit's tree (its module and function names, not this checkout's)
    from student_trainer.demo.assets import load_tokenizer
    from student_trainer.trainer import data
    from student_trainer.trainer.data import make_blocks, read_documents, split_documents

    assert not hasattr(data, "iter_blocks"), f"{data.__file__} is not the code of {OLD_COMMIT}"
    tok = load_tokenizer(TOKENIZER)
    base = _status()["VmRSS"]
    t0 = time.perf_counter()
    train, val = split_documents(read_documents([path], "text"), 0.05, 0)
    blocks = make_blocks(train, tok, SEQ_LEN, 16), make_blocks(val, tok, SEQ_LEN, 16)
    seconds = time.perf_counter() - t0
    now = _status()
    return {"seconds": seconds, "tokens": sum(len(b.ids) for part in blocks for b in part),
            "held_rss": now["VmRSS"] - base, "peak_rss": now["VmHWM"] - base, "base_rss": base}


def _child(args: list[str], tree: Path | None = None) -> dict:
    """Runs ``--child`` args in a fresh process; ``tree``: with that code instead of this checkout's."""
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
    cmd = [sys.executable, __file__, "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _old_tree(workdir: Path) -> Path:
    """The code of 29b6255 (``git archive``), run as a child's working directory / PYTHONPATH (same venv)."""
    tree = workdir / f"old-{OLD_COMMIT}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_COMMIT, "student_trainer", "protos"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


# --- trainer runs -----------------------------------------------------------------------------------------------

def _target(workdir: Path) -> Path:
    folder = workdir / "target"
    if not folder.exists():
        from student_trainer.demo.assets import build_tiny_model

        build_tiny_model("llama", TOKENIZER, folder, seed=7)
    return folder


def _trainer_config(workdir: Path, path: Path, name: str, steps: int, old: bool) -> Path:
    import yaml

    config = {"target": {"model": str(_target(workdir))}, "method": {"lambda_clm": 1.0},
              "data": {"train_files": [str(path)], "seq_len": SEQ_LEN, "cache_dir": str(workdir / "cache")},
              "train": {"max_steps": steps, "deepspeed": {"train_micro_batch_size_per_gpu": 1}},
              "run": {"output_dir": str(workdir / "runs" / name), "progress": False, "export": False,
                      "eval_blocks": 2, "resume": False}}
    if old:  # 29b6255 has no data cache
        del config["data"]["cache_dir"]
    shutil.rmtree(workdir / "runs" / name, ignore_errors=True)
    out = workdir / "runs" / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config))
    return out


def _env(tree: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    built = ROOT / ".venv" / "torch_extensions"
    if built.is_dir():
        env.setdefault("TORCH_EXTENSIONS_DIR", str(built))
    return env | ({"PYTHONPATH": str(tree)} if tree else {})


def _check_code(stderr: str, tree: Path | None, name: str) -> None:
    """The run's start-up line says which design ran: the new one logs its data cache."""
    if ('"cache":' in stderr) != (tree is None):
        raise RuntimeError(f"{name}: ran the wrong code (tree {tree}):\n{stderr[-2000:]}")


def first_step(workdir: Path, path: Path, name: str, tree: Path | None = None) -> float:
    """Seconds from starting ``python -m student_trainer`` to its first step in metrics.jsonl."""
    cfg = _trainer_config(workdir, path, name, steps=1, old=tree is not None)
    metrics = workdir / "runs" / name / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "student_trainer", "--config", str(cfg)], cwd=tree or ROOT,
                            env=_env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None:
            raise RuntimeError(f"{name}: trainer exited: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    _check_code(proc.communicate(timeout=600)[1], tree, name)
    return seconds


def two_ranks(workdir: Path, path: Path, name: str, tree: Path | None = None) -> list[dict]:
    """Per rank of a 2-rank run: peak VmHWM, and RssAnon / RssFile at the moment of the largest VmRSS."""
    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _trainer_config(workdir, path, name, steps=3, old=tree is not None)
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port),
           "--module", "student_trainer", "--config", str(cfg)]
    log = workdir / "runs" / f"{name}.log"
    launcher = subprocess.Popen(cmd, cwd=tree or ROOT, env=_env(tree), stdout=log.open("w"), stderr=subprocess.STDOUT)
    ranks: dict[int, dict] = {}
    while launcher.poll() is None:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if "--local_rank" not in " ".join(p.cmdline()):
                    continue
                now, best = _status(p.pid), ranks.setdefault(p.pid, {"VmHWM": 0, "VmRSS": 0})
                best["VmHWM"] = max(best["VmHWM"], now["VmHWM"])
                if now["VmRSS"] >= best["VmRSS"]:
                    best.update(VmRSS=now["VmRSS"], RssAnon=now["RssAnon"], RssFile=now["RssFile"])
            except (psutil.Error, FileNotFoundError, KeyError):
                pass
        time.sleep(0.2)
    if launcher.returncode != 0:
        raise RuntimeError(f"{name}: {log.read_text()[-3000:]}")
    _check_code(log.read_text(), tree, name)
    return [ranks[pid] for pid in sorted(ranks)]


# --- phases -----------------------------------------------------------------------------------------------------

def phase_prepare(workdir: Path, paths: dict[int, Path], args, res: dict) -> None:
    for size, path in paths.items():
        for procs in ([1, 2] if size <= args.both_max else [args.big_procs]) if "new" in args.designs else []:
            tmp = workdir / "prep-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"prepare new {size:.0e} procs={procs} ({_load()})", flush=True)
            r = _child(["new_prepare", str(path), str(tmp), str(procs)]) | {"load": os.getloadavg()}
            res.setdefault("prepare", {})[f"new {size} {procs}"] = r
            kept = workdir / "cache"
            for folder in tmp.iterdir() if tmp.exists() else []:
                if folder.is_dir() and not (kept / folder.name).exists():
                    kept.mkdir(exist_ok=True)
                    folder.rename(kept / folder.name)  # the key does not depend on the folder: later phases reuse it
            shutil.rmtree(tmp, ignore_errors=True)
        if size <= args.old_max and "old" in args.designs:
            print(f"prepare old {size:.0e} ({_load()})", flush=True)
            r = _child(["old_blocks", str(path)], _old_tree(workdir)) | {"load": os.getloadavg()}
            res.setdefault("prepare", {})[f"old {size}"] = r


def _warm(workdir: Path, path: Path, procs: int) -> None:
    _child(["new_prepare", str(path), str(workdir / "cache"), str(procs)])


def phase_first_step(workdir: Path, paths: dict[int, Path], args, res: dict) -> None:
    for size, path in paths.items():
        print(f"first step {size:.0e} ({_load()})", flush=True)
        out = res.setdefault("first_step", {}).setdefault(str(size), {})
        if "new" in args.designs:
            _warm(workdir, path, args.big_procs)
            out["open"] = _child(["new_open", str(path), str(workdir / "cache")])
            out["new"] = [first_step(workdir, path, f"first-{size}") for _ in range(args.repeats)]
        if size <= args.old_max and "old" in args.designs:
            out["old"] = [first_step(workdir, path, f"first-old-{size}", _old_tree(workdir))]
        out["load"] = os.getloadavg()


def phase_rss(workdir: Path, paths: dict[int, Path], args, res: dict) -> None:
    sizes = sorted(paths)
    for size in sorted({sizes[0], sizes[-1]}) if "new" in args.designs else []:
        _warm(workdir, paths[size], args.big_procs)
        print(f"2 ranks new {size:.0e} ({_load()})", flush=True)
        res.setdefault("rss", {})[f"new {size}"] = two_ranks(workdir, paths[size], f"rss-{size}")
    for size in sizes:
        if size <= args.old_max and "old" in args.designs:
            print(f"2 ranks old {size:.0e} ({_load()})", flush=True)
            res.setdefault("rss", {})[f"old {size}"] = two_ranks(workdir, paths[size], f"rss-old-{size}", _old_tree(workdir))


# --- report -----------------------------------------------------------------------------------------------------

def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def report(res: dict) -> str:
    lines = ["| corpus (target tokens in blocks) | design | processes | seconds | tokens/s | bytes/token on disk | "
             "peak RSS above start (workers) |", "|---|---|---:|---:|---:|---:|---:|"]
    for key, r in res.get("prepare", {}).items():
        design, size, *procs = key.split()
        per_token = f"{r['bytes'] / r['tokens']:.2f} (text {r['text_bytes'] / r['tokens']:.2f})" if "bytes" in r else \
            f"— (holds {r['held_rss'] / r['tokens']:.0f} B/token in RAM)"
        lines.append(f"| {r['tokens']:,} | {design} | {procs[0] if procs else 1} | {r['seconds']:.1f} | "
                     f"{r['tokens'] / r['seconds']:,.0f} | {per_token} | {_gb(r['peak_rss'])}"
                     + (f" ({_gb(r['workers_peak_rss'])})" if r.get("workers_peak_rss") else "") + " |")
    lines += ["", "| corpus | blocks | new: data part of the start (s) | data RSS after 1,000 micro-batches (anon + "
              "file-backed) | new: start -> first step (s) | old: start -> first step (s) |",
              "|---|---:|---:|---|---|---|"]
    for size, r in res.get("first_step", {}).items():
        o = r.get("open")
        new = (f"{o['blocks']:,} | {o['open_seconds']:.2f} | {o['anon_growth'] / 1e6:.1f} MB + "
               f"{o['file_growth'] / 1e6:.1f} MB | {', '.join(f'{x:.1f}' for x in r.get('new', []))}") if o else "— | — | — | —"
        lines.append(f"| {float(size):.0e} | {new} | {', '.join(f'{x:.1f}' for x in r.get('old', [])) or '—'} |")
    lines += ["", "| corpus | design | peak RSS rank 0 / rank 1 (VmHWM) | anon / file-backed at the largest RSS |",
              "|---|---|---|---|"]
    for key, ranks in res.get("rss", {}).items():
        design, size = key.split()
        parts = " / ".join(_gb(r["RssAnon"]) + " + " + _gb(r["RssFile"]) for r in ranks)
        lines.append(f"| {float(size):.0e} | {design} | {' / '.join(_gb(r['VmHWM']) for r in ranks)} | {parts} |")
    lines += ["", projection(res)]
    return "\n".join(lines)


def projection(res: dict) -> str:
    """MiniPile (1.8B tokens) x 8 ranks from the measured rates."""
    prep, rss = res.get("prepare", {}), res.get("rss", {})
    multi = [r for k, r in prep.items() if k.startswith("new") and not k.endswith(" 1")]
    old = sorted((r for k, r in prep.items() if k.startswith("old")), key=lambda r: r["tokens"])
    out = ["MiniPile x 8 ranks, projected:"]
    if multi:  # worker processes tokenize single-threaded: the rate per core
        best = max(multi, key=lambda r: r["tokens"])
        per_core = best["tokens"] / best["seconds"] / 2
        per_token = best["bytes"] / best["tokens"]
        out.append(f"- prepare once: {per_core:,.0f} tokens/s per core (largest corpus, 2 processes on 2 cores) -> "
                   f"{MINIPILE_TOKENS / per_core / 16 / 60:.0f} min with num_proc 16 if it scales linearly, "
                   f"{MINIPILE_TOKENS / per_core / 2 / 3600:.1f} h on a 2-core machine; cache "
                   f"{per_token * MINIPILE_TOKENS / 1e9:.0f} GB at {per_token:.2f} B/token (this corpus's text)")
    opened = sorted((int(k), r["open"]) for k, r in res.get("first_step", {}).items() if "open" in r)
    new_runs = sorted((int(k.split()[1]), max(r["VmHWM"] for r in v)) for k, v in rss.items() if k.startswith("new"))
    if len(opened) >= 2:
        (s0, r0), (s1, r1) = opened[0], opened[-1]
        slope = (r1["anon_growth"] - r0["anon_growth"]) / (s1 - s0)
        out.append(f"- new, data memory per rank (anonymous; the maps are shared page cache): "
                   f"{r1['anon_growth'] / 1e6:.0f} MB at {s1:.0e} tokens, {slope:+.2f} B/token between {s0:.0e} and "
                   f"{s1:.0e} -> {(r1['anon_growth'] + max(slope, 0) * (MINIPILE_TOKENS - s1)) / 1e6:.0f} MB at "
                   "MiniPile (the sampler's order: 8 bytes per block of the rank)")
    if len(new_runs) >= 2:
        out.append(f"- new, whole-run peak per rank: {_gb(new_runs[0][1])} at {new_runs[0][0]:.0e} tokens, "
                   f"{_gb(new_runs[-1][1])} at {new_runs[-1][0]:.0e} (tiny model; a 7B rank adds its model, not data)")
    if len(old) >= 2:
        slope = (old[-1]["held_rss"] - old[0]["held_rss"]) / (old[-1]["tokens"] - old[0]["tokens"])
        out.append(f"- old, RAM per rank for its blocks alone: {slope:.0f} B/token -> {_gb(slope * 2e8)} at 200M tokens, "
                   f"{_gb(slope * MINIPILE_TOKENS)} at MiniPile, x {RANKS} ranks per node; and every rank tokenizes "
                   f"all of it at every start: {MINIPILE_TOKENS / (old[-1]['tokens'] / old[-1]['seconds']) / 3600:.1f} h")
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        kind, *rest = sys.argv[2:]
        fn = {"new_prepare": lambda p, c, n: child_new_prepare(p, c, int(n)), "old_blocks": child_old_blocks,
              "new_open": child_new_open}[kind]
        print(json.dumps(fn(*rest)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/livefuse-bench-data"),
                        help="corpora, caches, runs and results.json go here (not the repository)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 5e6, 2e7, 2e8],
                        help="corpus sizes in target tokens")
    parser.add_argument("--phases", nargs="+", default=["corpus", "prepare", "first-step", "rss"],
                        choices=["corpus", "prepare", "first-step", "rss"], help="what to measure")
    parser.add_argument("--designs", nargs="+", default=["new", "old"], choices=["new", "old"],
                        help="which designs to run (results accumulate in results.json)")
    parser.add_argument("--old-max", type=float, default=5e6, help="largest corpus the old design is run on")
    parser.add_argument("--both-max", type=float, default=2e7, help="largest corpus prepared with 1 and 2 processes")
    parser.add_argument("--big-procs", type=int, default=2, help="processes for the larger corpora")
    parser.add_argument("--repeats", type=int, default=2, help="first-step runs per corpus")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_file = args.workdir / "results.json"
    res = json.loads(results_file.read_text()) if results_file.exists() else {}
    res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                      "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"{res['machine']} ({_load()})", flush=True)
    paths = {int(s): corpus(args.workdir, int(s)) for s in args.sizes}
    for phase, fn in (("prepare", phase_prepare), ("first-step", phase_first_step), ("rss", phase_rss)):
        if phase in args.phases:
            fn(args.workdir, paths, args, res)
            results_file.write_text(json.dumps(res, indent=1))
    print(report(res))


if __name__ == "__main__":
    main()
