"""The demo's report from given scores and curves (no training): mean ± sd per cell, the paired gains over
CLM-only, the sample-efficiency sentence and plot."""

from __future__ import annotations

from argparse import Namespace

import pytest

from student_trainer.demo.report import DemoResults, efficiency_sentences, validation_line, write_report


def _row(code: float, prose: float) -> dict[str, float]:
    return {"code_ppl": code, "prose_ppl": prose, "code_nats_per_char": code / 200, "prose_nats_per_char": prose / 500}


def test_three_seeds_give_mean_sd_paired_gains_and_the_efficiency_line(tmp_path):
    curve = [(0.0, 900.0), (100.0, 500.0), (200.0, 400.0)]
    faster = [(0.0, 900.0), (100.0, 450.0), (200.0, 300.0)]  # reaches 400 at 133 of 200 tokens
    result = DemoResults(
        scores={"clm_only": {0: _row(250, 950), 1: _row(260, 980), 2: _row(240, 940)},
                "min_ce": {0: _row(240, 930), 1: _row(250, 960), 2: _row(231, 921)},
                "avg_ce": {0: _row(255, 940), 1: _row(255, 990), 2: _row(235, 930)}},
        initial=_row(870, 1720),
        sources={"code": {"code_ppl": float("nan"), "prose_ppl": float("nan"), "code_nats_per_char": 1.2,
                          "prose_nats_per_char": 2.1}},
        curves={"clm_only": {s: curve for s in range(3)}, "min_ce": {s: faster for s in range(3)},
                "avg_ce": {s: curve for s in range(3)}},
    )
    table = write_report(tmp_path, result, Namespace(seeds=3, eval_blocks=48, seq_len=128, steps=60))
    assert "| target + clm_only | 250.000 ± 10.000 | 956.667 ± 20.817 |" in table
    assert "| source: code | – | – | 1.200 | 2.100 |" in table
    assert "| min_ce | -3.87 ± 0.13% (3/3) ✓ | -2.06 ± 0.04% (3/3) ✓ |" in table
    assert "| avg_ce | -0.67 ± 2.31% (2/3) | -0.37 ± 1.20% (2/3) |" in table and "mean ± sd over 3 seeds" in table
    assert "min_ce reaches clm_only's final validation perplexity after 67% of the training tokens" in table
    assert "avg_ce reaches clm_only's final validation perplexity after 100%" in table
    assert "Validation perplexity (" in table and "clm_only 400.0 ± 0.0, min_ce 300.0 ± 0.0, avg_ce 400.0 ± 0.0." in table
    assert (tmp_path / "results.md").read_text() == table
    assert (tmp_path / "sample_efficiency.png").stat().st_size > 10_000


def test_no_clm_only_run_no_efficiency_line():
    assert efficiency_sentences({"min_ce": {0: [(0.0, 1.0)]}}) == ""


def test_validation_line_gives_each_modes_final_point_and_one_seed_has_no_sd():
    line = validation_line({"clm_only": {0: [(0.0, 900.0), (10.0, 412.34)]}, "tau_1": {0: [(0.0, 900.0), (10.0, 401.0)]}})
    assert line.endswith("clm_only 412.3, tau_1 401.0.\n")
    assert validation_line({}) == ""


def test_results_round_trip_with_int_seeds_and_refuse_another_version(tmp_path):
    result = DemoResults(scores={"clm_only": {0: _row(250, 950)}}, initial=_row(870, 1720),
                         sources={"code": {"code_ppl": float("nan"), "code_nats_per_char": 1.2}},
                         curves={"clm_only": {0: [(0.0, 900.0), (10.0, 400.0)]}})
    result.write(tmp_path / "results.json")
    back = DemoResults.read(tmp_path / "results.json")
    assert list(back.scores["clm_only"]) == [0] and back.curves["clm_only"][0][1] == (10.0, 400.0)
    assert back.version == 2 and back.initial == result.initial
    (tmp_path / "old.json").write_text((tmp_path / "results.json").read_text().replace('"version": 2', '"version": 1'))
    with pytest.raises(ValueError, match=r"old.json: not a DemoResults of this livefuse \(version 2\)"):
        DemoResults.read(tmp_path / "old.json")


def _gen(nll: float, distinct: float = 0.5) -> dict[str, float]:
    return {f"{d}_{k}": v for d in ("code", "prose") for k, v in
            {"gen_nats_per_char": nll, "gen_expert_nats_per_char": nll + 0.1, "distinct2": distinct, "rep4": 0.01,
             "gen_tokens": 64.0}.items()}


def test_generation_scores_get_their_table_and_on_policy_modes_a_second_baseline(tmp_path):
    nll = {"clm_only": (1.6, 1.62, 1.58), "min_ce": (1.5, 1.52, 1.49), "on_policy_min_ce": (1.45, 1.47, 1.44),
           "avg_ce": (1.5, 1.5, 1.5)}
    scores = {m: {s: {**_row(250 + s, 950), **_gen(v[s])} for s in range(3)} for m, v in nll.items()}
    result = DemoResults(scores=scores, initial={**_row(870, 1720), **_gen(2.5, 0.9)},
                         sources={}, reference=_gen(1.2, 0.6), on_policy=["on_policy_min_ce"])
    table = write_report(tmp_path, result, Namespace(seeds=3, eval_blocks=48, seq_len=128, steps=60, gen_prompts=48, gen_temperature=0.7))
    assert "| held-out text (reference) | 1.200 | 1.200 | 1.300 | 1.300 | 0.600 | 0.600 | 0.010 | 0.010 | 64.0 | 64.0 |" in table
    assert "| target (initial) | 2.500 | 2.500 | 2.600 |" in table
    assert "| target + on_policy_min_ce | 1.453 ± 0.015 | 1.453 ± 0.015 |" in table
    vs_clm, vs_min_ce = table.split("Paired change against clm_only")[1].split("Paired change against min_ce")
    assert "| mode | code_ppl | prose_ppl | code_gen_nats_per_char | prose_gen_nats_per_char |" in vs_clm
    assert "| on_policy_min_ce | 0.00 ± 0.00% (0/3) | 0.00 ± 0.00% (0/3) | -9.17 ± 0.27% (3/3) ✓ |" in vs_clm
    assert "| on_policy_min_ce | 0.00 ± 0.00% (0/3) | 0.00 ± 0.00% (0/3) | -3.33 ± 0.03% (3/3) ✓ |" in vs_min_ce
    assert "| avg_ce |" in vs_clm and "| avg_ce |" not in vs_min_ce and "| clm_only |" not in vs_min_ce


def test_without_generation_scores_the_report_is_as_before(tmp_path):
    result = DemoResults(scores={"clm_only": {0: _row(250, 950)}, "min_ce": {0: _row(240, 930)}},
                         initial=_row(870, 1720), sources={}, on_policy=["min_ce"])
    table = write_report(tmp_path, result, Namespace(seeds=1, eval_blocks=48, seq_len=128, steps=60, gen_prompts=0, gen_temperature=0.7))
    assert "What the models generate" not in table and "gen_nats_per_char" not in table
    assert "| mode | code_ppl | prose_ppl |\n" in table
