"""Train a target model on λ·CLM + (1−λ)·fusion with teacher distributions fetched live.

    livefuse-train --config configs/tiny_cpu.yaml [key=value ...]
    python -m student_trainer --config run.yaml method.fusion=avg_ce train.max_steps=100
    deepspeed --num_gpus 8 --module student_trainer --config run.yaml     # or: torchrun -m student_trainer

``key=value`` overrides any setting by its dotted path (values are YAML: numbers, lists, true/false).
Exit codes: 0 done, 2 bad config, 3 a source failed, 130 stopped by Ctrl-C or SIGTERM (in the last two a
checkpoint was saved: rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys

from protos.logs import setup_logging
from student_trainer.trainer.config import load_trainer_config
from student_trainer.trainer.extensions import default_extensions_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livefuse-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with the trainer config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a setting by dotted path, e.g. method.fusion=avg_ce train.max_steps=50")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; not needed otherwise")
    args = parser.parse_args(argv)
    setup_logging("text", "WARNING")
    try:
        config = load_trainer_config(args.config, args.overrides)
    except (ValueError, OSError) as err:
        print(f"livefuse-train: {err}", file=sys.stderr)
        return 2
    if (prebuilt := default_extensions_dir()) is not None:  # DeepSpeed's ops, built by scripts/setup.sh
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(prebuilt))
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
    except ValueError as err:
        print(f"livefuse-train: {err}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
