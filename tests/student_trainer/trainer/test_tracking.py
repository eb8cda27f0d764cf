"""run.report_to: the config's tracker names are the registry's, bad lists fail when the config is read, a missing
package fails before the run starts, and metrics.jsonl is written whatever the trackers. (The trackers
themselves, for real: test_tracked_export.py.)"""

from __future__ import annotations

import importlib.util
import json
import typing

import pytest

from student_trainer.trainer import run_log
from student_trainer.trainer.config import TrackerName, TrainerConfig, load_trainer_config
from student_trainer.trainer.run_log import TRACKERS, RunLogger
from student_trainer.trainer.stats import StepRecord


def _config(tmp_path, **run) -> TrainerConfig:
    return TrainerConfig(target={"model": "m"}, data={"train_files": ["a.txt"]}, method={"lambda_clm": 1.0},
                         run={"output_dir": str(tmp_path / "out"), "progress": False, **run})


def test_tracker_names_are_the_registry(tmp_path):
    assert set(typing.get_args(TrackerName)) == set(TRACKERS)
    assert _config(tmp_path).run.report_to == ["tensorboard"]  # the default


@pytest.mark.parametrize(("value", "message"), [("[mlflow]", "'tensorboard', 'wandb' or 'trackio'"),
                                                ("[wandb, wandb]", "lists a tracker twice")])
def test_a_bad_report_to_fails_when_the_config_is_read(tmp_path, value, message):
    base = tmp_path / "run.yaml"
    base.write_text("target: {model: m}\ndata: {train_files: [a.txt]}\nmethod: {lambda_clm: 1.0}\n"
                    f"run: {{output_dir: {tmp_path}}}\n")
    with pytest.raises(ValueError, match="run.report_to") as err:
        load_trainer_config(base, [f"run.report_to={value}"])
    assert message in str(err.value)


def test_a_missing_tracker_package_fails_before_the_run_starts(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(run_log.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ValueError, match=r"run.report_to: 'wandb' needs the wandb package.*livefuse\[track\]"):
        RunLogger(tmp_path / "out", rank=1, config=_config(tmp_path, report_to=["tensorboard", "wandb"]))


def test_no_tracker_still_writes_metrics_jsonl(tmp_path):
    logger = RunLogger(tmp_path / "out", 0, _config(tmp_path, report_to=[]))
    logger.open_metrics(0)
    logger.start(1)
    logger.step(StepRecord(1, 2.5, 2.5, 0.0, 64.0, step_seconds=0.1))
    logger.eval(1, {"student/ppl_token": 9.0})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 1] and lines[1]["eval"] == {"student/ppl_token": 9.0}
    assert not (tmp_path / "out" / "tensorboard").exists()
