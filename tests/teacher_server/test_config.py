"""TeacherConfig: YAML + overrides, and errors that name the field, the value and what is accepted."""

from __future__ import annotations

import pytest

from teacher_server.__main__ import build_parser
from teacher_server.config import TeacherConfig, load_config
from tests import REPO


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "teacher.yaml"
    path.write_text("model: org/model\nmax_top_k: 32\nport: 6000\ncompile: true\n")
    config = load_config(path, {"port": 7000})
    assert (config.model, config.max_top_k, config.port, config.compile) == ("org/model", 32, 7000, True)
    assert config.dtype == "auto" and config.default_top_k == 10


@pytest.mark.parametrize(("override", "words"), [
    ({"backend": "tgi"}, ["backend", "'tgi'", "hf"]),
    ({"dtype": "fp8"}, ["dtype", "'fp8'", "bfloat16"]),
    ({"device": "tpu:0"}, ["device", "tpu:0", "cuda:N"]),
    ({"max_top_k": 0}, ["max_top_k", "greater than or equal to 1", "got 0"]),
    ({"port": 70000}, ["port", "70000"]),
    ({"log_format": "xml"}, ["log_format", "'json'", "'text'"]),
    ({"max_top_k_typo": 3}, ["max_top_k_typo", "Extra inputs"]),
    ({"default_top_k": 50, "max_top_k": 20}, ["default_top_k=50", "max_top_k=20"]),
    ({"max_tokens_per_text": 9000, "max_batch_tokens": 8192}, ["max_tokens_per_text=9000", "max_batch_tokens=8192"]),
])
def test_bad_values_are_named(override, words):
    with pytest.raises(ValueError) as err:
        load_config(overrides={"model": "m", **override})
    for word in words:
        assert word in str(err.value), str(err.value)


def test_model_is_required_and_yaml_must_be_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="model: Field required"):
        load_config(overrides={})
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(path)


def test_cli_flags_cover_every_field_and_only_given_flags_override(tmp_path):
    path = tmp_path / "teacher.yaml"
    path.write_text("model: from-yaml\nwarmup: false\nmetrics_port: 9999\n")
    args = vars(build_parser().parse_args(["--config", str(path), "--metrics-port", "none", "--max-top-k", "5",
                                           "--default-top-k", "5"]))
    config = load_config(args.pop("config"), args)
    assert config.model == "from-yaml" and config.warmup is False  # untouched by absent flags
    assert config.metrics_port is None and config.max_top_k == 5
    dests = {a.dest for a in build_parser()._actions}
    assert set(TeacherConfig.model_fields) <= dests


def test_optional_float_flags_take_none_and_help_prints(capsys):
    """``--max-connection-age-s none`` turns the connection age off (float | None); --help renders every
    description (argparse %-formats help: a literal % in a description used to crash it)."""
    args = vars(build_parser().parse_args(["--model", "m", "--max-connection-age-s", "off"]))
    assert load_config(None, {k: v for k, v in args.items() if k != "config"}).max_connection_age_s is None
    assert load_config(None, {"model": "m"}).max_connection_age_s == 300.0
    assert build_parser().parse_args(["--max-connection-age-s", "2.5"]).max_connection_age_s == 2.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-connection-age-s", "soon"])
    assert "invalid float or none value: 'soon'" in capsys.readouterr().err
    assert "--max-connection-age-s" in build_parser().format_help()


def test_readme_documents_every_setting():

    readme = (REPO / "docs" / "TEACHER.md").read_text()
    for name in TeacherConfig.model_fields:
        assert f"| `{name}` | `--{name.replace('_', '-')}` |" in readme, name


def test_backend_names_are_the_registry_and_flags_list_choices(capsys):
    import typing

    from teacher_server.backends import BACKENDS

    assert set(typing.get_args(TeacherConfig.model_fields["backend"].annotation)) == set(BACKENDS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--dtype", "fp8"])
    err = capsys.readouterr().err
    assert "argument --dtype: invalid choice: 'fp8'" in err and "bfloat16" in err


def test_limits_whose_worst_case_response_does_not_fit_the_message_limit_fail_at_start():
    """max_tokens_per_request x max_top_k at fp32 (8 bytes per entry, plus ids, offsets, framing) must fit."""
    with pytest.raises(ValueError) as err:
        load_config(overrides={"model": "m", "max_message_bytes": 64 * 1024 * 1024})  # the defaults need ~139 MB
    for word in ("max_message_bytes=67108864", "max_tokens_per_request=262144", "max_top_k=64", "fp32"):
        assert word in str(err.value), str(err.value)
    load_config(overrides={"model": "m", "max_message_bytes": 64 * 1024 * 1024, "max_top_k": 16})  # fits


def test_max_gather_ids_defaults_to_a_top_k_worth_on_hf_and_to_0_on_vllm():
    config = load_config(overrides={"model": "m", "max_top_k": 8, "default_top_k": 8, "max_tokens_per_request": 1000,
                                    "max_tokens_per_text": 1000})
    assert config.max_gather_ids == 8 * 1000  # as many log-probs as a top-k of every token
    assert load_config(overrides={"model": "m", "max_gather_ids": None}).max_gather_ids == 64 * 262144
    assert load_config(overrides={"model": "m", "backend": "vllm"}).max_gather_ids == 0
    assert load_config(overrides={"model": "m", "backend": "vllm", "max_gather_ids": 0}).max_gather_ids == 0
    args = vars(build_parser().parse_args(["--model", "m", "--max-gather-ids", "5"]))
    assert load_config(args.pop("config"), args).max_gather_ids == 5
    args = vars(build_parser().parse_args(["--model", "m", "--max-gather-ids", "none"]))
    assert load_config(args.pop("config"), args).max_gather_ids == 64 * 262144


@pytest.mark.parametrize(("override", "words"), [
    ({"max_gather_ids": -1}, ["max_gather_ids", "greater than or equal to 0", "got -1"]),
    ({"max_gather_ids": 2**32}, ["max_gather_ids", "less than or equal to 4294967295"]),
    ({"backend": "vllm", "max_gather_ids": 10}, ["max_gather_ids=10", "backend=vllm cannot gather", "backend=hf"]),
])
def test_bad_max_gather_ids_are_named(override, words):
    with pytest.raises(ValueError) as err:
        load_config(overrides={"model": "m", **override})
    for word in words:
        assert word in str(err.value), str(err.value)


def test_gathered_bytes_count_in_the_start_up_check_at_the_limit_and_one_past():
    """The largest response includes max_gather_ids fp32 log-probs: limits that fit exactly start; one more
    gathered id does not, and the message names max_gather_ids."""
    from teacher_server.limits import worst_case_response_bytes

    limits = {"model": "m", "max_tokens_per_request": 1000, "max_top_k": 4, "default_top_k": 4, "max_texts_per_request": 2,
              "max_tokens_per_text": 500, "max_batch_tokens": 500, "max_queue_tokens": 1000}
    fits = worst_case_response_bytes(1000, 4, 2, 5000)
    assert fits == worst_case_response_bytes(1000, 4, 2) + 4 * 5000
    load_config(overrides={**limits, "max_message_bytes": fits, "max_gather_ids": 5000})
    with pytest.raises(ValueError) as err:
        load_config(overrides={**limits, "max_message_bytes": fits, "max_gather_ids": 5001})
    for word in (f"max_message_bytes={fits}", "max_gather_ids=5001", f">= {fits + 4}"):
        assert word in str(err.value), str(err.value)


def test_max_gather_ids_left_out_takes_what_fits_beside_the_top_k():
    """A config sized tightly for top-k alone (it started before gather existed) still starts: the default
    takes only the room left in max_message_bytes, and the worst case then fits exactly (to 3 bytes)."""
    from teacher_server.limits import worst_case_response_bytes

    tight = {"model": "m", "max_tokens_per_request": 80, "max_top_k": 16, "max_tokens_per_text": 64,
             "max_message_bytes": 64 * 1024}
    config = load_config(overrides=tight)
    assert 0 < config.max_gather_ids < 80 * 16
    worst = worst_case_response_bytes(80, 16, config.max_texts_per_request, config.max_gather_ids)
    assert config.max_message_bytes - 4 < worst <= config.max_message_bytes
    with pytest.raises(ValueError, match="max_gather_ids=1280"):  # asked explicitly, a top-k's worth does not fit
        load_config(overrides={**tight, "max_gather_ids": 80 * 16})
