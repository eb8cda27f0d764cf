"""glibc malloc settings on CPU (``student_trainer/demo/cpu_malloc.py``): a tiny LM's training step with
the default allocator and with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1 GiB``, side by side.

    .venv/bin/python bench/cpu_malloc.py                     # llama + llama-spm and gpt2 + gpt-2, 3 rounds
    .venv/bin/python bench/cpu_malloc.py --models gpt2 --batch 8 --seq-len 128 --steps 10 --rounds 2

Each (model, setting) runs in its own child process (glibc reads the variables at start-up); the two settings
alternate per round (ABBA) so drift on a shared machine hits both alike. A child builds the demo's model shape
(hidden 64, 2 layers, the real tokenizer's vocabulary), warms up 2 steps (AdamW state), then times ``--steps``
steps of forward + backward + optimizer on random tokens and reports wall and CPU seconds per step and its
minor page faults. Printed: per round and median, default / tuned (> 1 = the settings are faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from student_trainer.demo.cpu_malloc import ENV as TUNED  # noqa: E402  (after the path insert)

MODELS = {"llama": ("llama", "llama-spm"), "gpt2": ("gpt2", "gpt-2")}  # name -> (architecture, tokenizer)


def child(model_dir: str, batch: int, seq_len: int, steps: int) -> None:
    """One timed loop in this process; prints a JSON line."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    print(json.dumps({"wall_s": (time.perf_counter() - wall) / steps, "cpu_s": (time.process_time() - cpu) / steps,
                      "minor_faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps}))


def run_child(model_dir: Path, tuned: bool, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TUNED} | (TUNED if tuned else {})
    cmd = [sys.executable, __file__, "--child", str(model_dir), "--batch", str(args.batch), "--seq-len",
           str(args.seq_len), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="model shapes to time")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8, the demo's pretraining)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per child (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="ABBA rounds per model (default 3)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.batch, args.seq_len, args.steps)
        return
    from student_trainer.demo.assets import build_tiny_model
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}; batch {args.batch} x {args.seq_len}, {args.steps} steps per child")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            arch, tokenizer = MODELS[name]
            model_dir = build_tiny_model(arch, tokenizer, Path(tmp) / name, hidden=64, layers=2, max_len=512)
            ratios = []
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                res = {tuned: run_child(model_dir, tuned, args) for tuned in order}
                ratio = res[False]["wall_s"] / res[True]["wall_s"]
                ratios.append(ratio)
                print(f"{name} round {r}: default {res[False]['wall_s']:.3f} s/step (cpu {res[False]['cpu_s']:.3f}, "
                      f"{res[False]['minor_faults']:.0f} faults/step) | tuned {res[True]['wall_s']:.3f} s/step "
                      f"(cpu {res[True]['cpu_s']:.3f}, {res[True]['minor_faults']:.0f} faults/step) | "
                      f"default/tuned {ratio:.2f}x", flush=True)
            print(f"{name}: median default/tuned {statistics.median(ratios):.2f}x "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
