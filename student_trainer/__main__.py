"""Train a target model on λ·CLM + (1−λ)·fusion with teacher distributions fetched live.

    livefuse-train --config configs/tiny_cpu.yaml [key=value ...]
    livefuse-train prepare --config run.yaml [key=value ...]   # tokenize the corpus once, before any run
    python -m student_trainer --config run.yaml method.fusion=avg_ce train.max_steps=100
    deepspeed --num_gpus 8 --module student_trainer --config run.yaml     # or: torchrun -m student_trainer

``key=value`` overrides any setting by its dotted path (values are YAML: numbers, lists, true/false).
``prepare`` builds the on-disk corpus cache a run reads (the first run would build it too, while the other
ranks wait); it needs only the target tokenizer, not DeepSpeed, the model or the teachers.
Exit codes: 0 done, 2 bad config (a setting that cannot work, in one line), 3 a source failed, 130 stopped by
Ctrl-C or SIGTERM (in the last two a checkpoint was saved: rerun the same command to resume); anything else is
a bug: a traceback and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from protos.logs import setup_logging
from student_trainer.trainer.config import ConfigError, load_trainer_config
from student_trainer.trainer.extensions import default_extensions_dir, prefer_venv_ninja
from student_trainer.trainer.inputs import check_inputs


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with the trainer config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a setting by dotted path, e.g. method.fusion=avg_ce train.max_steps=50")
    return parser


def _console() -> None:
    """The ``livefuse`` logger on stderr for a person; each rank's lines say which rank when there are several."""
    rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
    setup_logging("console", "INFO", prefix="livefuse" if world <= 1 else f"livefuse rank {rank}")


def prepare_main(argv: list[str]) -> int:
    """``livefuse-train prepare``: builds (or checks) the corpus cache of a config; exit 0 when it is ready.
    Prints the corpus facts as one JSON line on stdout."""
    args = _parser("livefuse-train prepare").parse_args(argv)
    _console()
    try:
        config = load_trainer_config(args.config, args.overrides)
        check_inputs(config, sources=False)  # the teachers play no part in preparing the corpus
        if config.data.streaming:
            print("livefuse-train prepare: data.streaming is true: documents are tokenized on the fly, "
                  "nothing to prepare", file=sys.stderr)
            return 0
        from student_trainer.trainer.data.blocks import load_target_tokenizer
        from student_trainer.trainer.data.prepared import prepare_corpus

        prepared = prepare_corpus(config.data, load_target_tokenizer(config.target.tokenizer or config.target.model))
    except (ConfigError, OSError) as err:
        print(f"livefuse-train prepare: {err}", file=sys.stderr)
        return 2
    print(f"ready: {prepared.folder}", file=sys.stderr)
    print(json.dumps(prepared.facts()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    parser = _parser("livefuse-train")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; not needed otherwise")
    args = parser.parse_args(argv)
    _console()
    try:
        config = load_trainer_config(args.config, args.overrides)
        check_inputs(config)
    except (ConfigError, OSError) as err:
        print(f"livefuse-train: {err}", file=sys.stderr)
        return 2
    if (prebuilt := default_extensions_dir()) is not None:  # DeepSpeed's ops, built by scripts/setup.sh
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(prebuilt))
        prefer_venv_ninja()  # the ninja setup.sh built them with: another one would rebuild them
    from student_trainer.trainer.loop import train
    from student_trainer.trainer.sources import SourceChanged, SourceFailed
    from student_trainer.trainer.stopping import Interrupted

    try:
        train(config)
    except (SourceFailed, SourceChanged) as err:
        print(f"livefuse-train: {err}", file=sys.stderr)
        return 3
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"livefuse-train: stopped ({err or 'Ctrl-C'}); rerun the same command to resume", file=sys.stderr)
        return 130
    except ConfigError as err:  # found at start-up (data, a teacher's limits, trackers); a bug propagates: exit 1
        print(f"livefuse-train: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
