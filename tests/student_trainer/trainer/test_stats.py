"""Step records: sums add up exactly, rates are taken when shown, the summary has the documented format."""

from __future__ import annotations

import re

import pytest

from student_trainer.trainer.stats import FusionStats, SourceStats, StepRecord, summary
from tests import REPO


def _record(step: int, selected: int, seconds: float) -> StepRecord:
    fusion = FusionStats(micro_batches=2, sequences=4, predicted_positions=100, aligned_positions=80,
                         sources={"code": SourceStats(selected=selected, weight=selected, ce_sum=4.0, ce_count=4,
                                                      latency_s=0.8),
                                  "prose": SourceStats(selected=4 - selected, weight=4 - selected, skipped=1,
                                                       ce_sum=6.0, ce_count=3, latency_s=0.4)})
    return StepRecord(step, 6.0, 5.9, 7.0, tokens=1000, step_seconds=seconds, teacher_wait_seconds=0.01,
                      fusion=fusion)


def test_fusion_stats_add_and_flatten_to_the_metric_keys():
    total = FusionStats.total([_record(1, 3, 1.0).fusion, _record(2, 1, 1.0).fusion])
    assert total.sequences == 8 and total.sources["code"].selected == 4
    m = total.metrics()
    assert m["selected/code"] == 0.5 and m["skipped/prose"] == 0.25 and m["ce/prose"] == 2.0
    assert m["latency/code"] == pytest.approx(0.4) and m["aligned_share"] == 0.8


def test_summary_has_the_format_the_readme_documents():
    text = summary([_record(51, 3, 0.5), _record(52, 1, 1.5)])
    lines = text.splitlines()
    assert lines[0] == ("summary steps 51-52: loss 6.0000 (clm 5.9000, fusion 7.0000), 1000 tokens/s, waited "
                        "for teachers 1.0% of the time, aligned positions 80.0%")
    assert lines[1] == "  source code: latency 0.400s/micro-batch, CE 1.000, selected 50.0%, weight 0.500, skipped 0.0%"
    assert lines[2] == ("  source prose: latency 0.200s/micro-batch, CE 2.000, selected 50.0%, weight 0.500, "
                        "skipped 25.0%")
    readme = (REPO / "docs" / "TRAINER.md").read_text()
    shape = re.sub(r"\d+(\.\d+)?", "N", text)
    documented = [re.sub(r"\d+(\.\d+)?", "N", line) for line in readme.splitlines() if "summary steps" in line
                  or line.strip().startswith("source ")]
    assert all(re.sub(r"code|prose", "X", line.strip()) in {re.sub(r"code|prose", "X", d.strip()) for d in documented}
               for line in shape.splitlines())
