"""Train a target model on λ·CLM + (1−λ)·fusion with teacher distributions fetched live.

    livefuse-train --config configs/tiny_cpu.yaml [key=value ...]
    python -m student_trainer --config run.yaml method.fusion=avg_ce train.max_steps=100
    deepspeed --num_gpus 8 --module student_trainer --config run.yaml     # or: torchrun -m student_trainer

``key=value`` overrides any setting by its dotted path (values are YAML: numbers, lists, true/false).
Exit codes: 0 done, 2 bad config, 3 a source failed (a checkpoint was saved; rerun the same command).
"""

from __future__ import annotations

import argparse
import logging
import sys

from student_trainer.config import load_trainer_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livefuse-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with the trainer config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a setting by dotted path, e.g. method.fusion=avg_ce train.max_steps=50")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; not needed otherwise")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_trainer_config(args.config, args.overrides)
    except (ValueError, OSError) as err:
        print(f"livefuse-train: {err}", file=sys.stderr)
        return 2
    from student_trainer.teachers import SourceChanged, SourceFailed
    from student_trainer.trainer import train

    try:
        train(config)
    except (SourceFailed, SourceChanged) as err:
        print(f"livefuse-train: {err}", file=sys.stderr)
        return 3
    except ValueError as err:
        print(f"livefuse-train: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
