"""docker/: every compose file passes a real compose implementation (docker-compose config), and the images'
entry commands, healthchecks and trainer configs match the CLIs the rest of the suite exercises.

No image is built or run here (no Docker engine); these checks read the files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from student_trainer.trainer.config import load_trainer_config
from teacher_server import healthcheck
from teacher_server.__main__ import build_parser as teacher_parser
from teacher_server.config import load_config
from tests import REPO

DOCKER = REPO / "docker"
COMPOSE_FILES = sorted(DOCKER.glob("*.yaml"))
MAIN_COMPOSE = DOCKER / "compose.yaml"
# what the user must set for docker/compose.trainer-remote.yaml; any trainer config will do for the checks
ENV = {"TRAINER_CONFIG": str(REPO / "configs" / "paper_llama2.yaml")}
PAPER_SOURCES = {"meta-llama/Llama-2-7b-hf", "openlm-research/open_llama_7b_v2", "mosaicml/mpt-7b"}
GPUS_PER_NODE = 8
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose binary not installed "
                                   "(scripts/test.sh installs it: apt-get install docker-compose)")


# --- reading the files -------------------------------------------------------------------------------------------

def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (DOCKER / name).read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip()]


def instruction(name: str, kind: str) -> list[str]:
    """Every ``kind`` instruction's argument text (in order)."""
    return [rest for instr, rest in dockerfile(name) if instr == kind]


def exec_form(text: str) -> list[str]:
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), f"not exec form: {text}"
    return argv


def arg_defaults(name: str) -> dict[str, str]:
    return dict(rest.split("=", 1) for rest in instruction(name, "ARG") if "=" in rest)


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose variable substitution (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if op in (":-", "-"):
            return env[name] if env.get(name) or (op == "-" and name in env) else arg
        if op == ":?" and not env.get(name):
            raise ValueError(f"{name} is required: {arg}")
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(:-|-|:\?)?([^}]*)\}", sub, value).replace("$$", "$")


def compose(path: Path) -> dict:
    return interpolate(yaml.safe_load(path.read_text()), ENV)


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def teachers(doc: dict) -> dict[str, dict]:
    return {name: s for name, s in doc["services"].items() if "teacher.Dockerfile" in s["build"]["dockerfile"]}


def trainers(doc: dict) -> dict[str, dict]:
    return {name: s for name, s in doc["services"].items() if "trainer.Dockerfile" in s["build"]["dockerfile"]}


def seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text))


def deepspeed_args(argv: list[str]):
    """The deepspeed launcher's own parse of its argv (fails on an unknown launcher flag)."""
    runner = pytest.importorskip("deepspeed.launcher.runner", reason="deepspeed (livefuse[train]) not installed")
    return runner.parse_args(argv)


def host_path(service: dict, compose_file: Path, container_path: str) -> Path:
    """The host file a bind mount of ``service`` puts at ``container_path``."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")) and (container_path == target or container_path.startswith(target + "/")):
            return (compose_file.parent / source / os.path.relpath(container_path, target)).resolve()
    raise AssertionError(f"{container_path} is not bind-mounted from the host")


def gpu_ids(service: dict) -> list[str] | str:
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    return device.get("device_ids") or device["count"]


# --- a real compose implementation ---------------------------------------------------------------------------

def run_compose(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    return subprocess.run([DOCKER_COMPOSE, "-f", str(path), "config"], capture_output=True, text=True,
                          env={**clean, **env}, timeout=60)


def test_there_are_compose_files():
    assert {p.name for p in COMPOSE_FILES} >= {"compose.yaml", "compose.trainer-remote.yaml"}


@needs_compose
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_docker_compose_accepts_the_file(path):
    result = run_compose(path, ENV)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["services"]


@needs_compose
def test_docker_compose_rejects_an_unknown_key(tmp_path):
    """The validator is real: a misspelt key fails."""
    doc = yaml.safe_load(MAIN_COMPOSE.read_text())
    doc["services"]["trainer"]["depends_onn"] = doc["services"]["trainer"].pop("depends_on")
    bad = DOCKER / f".tmp-{os.getpid()}.yaml"  # same folder: the relative build contexts still resolve
    try:
        bad.write_text(yaml.safe_dump(doc))
        result = run_compose(bad, ENV)
    finally:
        bad.unlink()
    assert result.returncode != 0 and "depends_onn" in result.stderr


@needs_compose
def test_remote_trainer_demands_a_config_file():
    result = run_compose(DOCKER / "compose.trainer-remote.yaml", {})
    assert result.returncode != 0 and "set TRAINER_CONFIG" in result.stderr


# --- images ----------------------------------------------------------------------------------------------------

def test_teacher_entrypoint_is_the_console_script():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = instruction("teacher.Dockerfile", "ENTRYPOINT")
    assert exec_form(entrypoint) == ["livefuse-teacher"]
    assert scripts["livefuse-teacher"] == "teacher_server.__main__:main"
    (cmd,) = instruction("teacher.Dockerfile", "CMD")
    assert exec_form(cmd) == ["--help"] or teacher_parser().parse_args(exec_form(cmd))


def test_teacher_healthcheck_runs_the_probe_module():
    (check,) = instruction("teacher.Dockerfile", "HEALTHCHECK")
    options, _, cmd = check.partition(" CMD ")
    argv = exec_form(cmd)
    assert argv[:3] == ["python", "-m", "teacher_server.healthcheck"]
    assert healthcheck.build_parser().parse_args(argv[3:]).port == 50051
    assert "--start-period=" in options and "--timeout=" in options


@pytest.mark.parametrize("name", ["teacher.Dockerfile", "trainer.Dockerfile"])
def test_image_is_non_root_with_the_hf_cache_volume(name):
    user = instruction(name, "USER")
    assert user and user[-1] not in ("root", "0")
    env = " ".join(instruction(name, "ENV"))
    assert "HF_HOME=/cache/huggingface" in env
    assert any("/cache/huggingface" in exec_form(v) for v in instruction(name, "VOLUME"))
    assert arg_defaults(name)["BASE_IMAGE"].startswith("nvidia/cuda:")


@pytest.mark.parametrize("name", ["teacher.Dockerfile", "trainer.Dockerfile"])
def test_image_installs_the_pinned_torch_and_what_it_copies_is_in_the_context(name):
    pins = dict(line.split("==") for line in (REPO / "requirements-ci.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert arg_defaults(name)["TORCH_VERSION"] == pins["torch"]
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for copy in instruction(name, "COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY {source}: not in the repository"
            assert source.rstrip("/") not in ignored, f"{name}: COPY {source}: excluded by .dockerignore"


def test_teacher_image_exposes_the_default_ports():
    exposed = " ".join(instruction("teacher.Dockerfile", "EXPOSE")).split()
    defaults = load_config(overrides={"model": "m"})
    assert {str(defaults.port), str(defaults.metrics_port)} <= set(exposed)


def test_trainer_entrypoint_is_deepspeed_running_the_trainer_module():
    (entrypoint,) = instruction("trainer.Dockerfile", "ENTRYPOINT")
    (cmd,) = instruction("trainer.Dockerfile", "CMD")
    assert exec_form(entrypoint) == ["deepspeed"]
    args = deepspeed_args(exec_form(cmd))
    assert args.module and args.user_script == "student_trainer"
    config = args.user_args[args.user_args.index("--config") + 1]
    assert config.startswith("/app/configs/") and any(c.startswith("configs") for c in instruction(
        "trainer.Dockerfile", "COPY")), "the default config must be copied into the image"
    load_trainer_config(REPO / "configs" / Path(config).name)  # the container's files


# --- compose services --------------------------------------------------------------------------------------------

def test_the_default_teachers_are_the_papers_sources():
    served = {load_config(overrides=_teacher_flags(s)).model for s in teachers(compose(MAIN_COMPOSE)).values()}
    assert served == PAPER_SOURCES


def _teacher_flags(service: dict) -> dict:
    args = vars(teacher_parser().parse_args(command(service)))  # SystemExit on a flag livefuse-teacher lacks
    args.pop("config")
    return args


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_teacher_services_match_the_cli(path):
    for name, service in teachers(compose(path)).items():
        config = load_config(overrides=_teacher_flags(service))  # flags parse and validate
        assert config.device.startswith("cuda"), f"{name}: a 7B teacher must not fall back to CPU"
        probe = service["healthcheck"]["test"]
        assert probe[:4] == ["CMD", "python", "-m", "teacher_server.healthcheck"], name
        assert healthcheck.build_parser().parse_args(probe[4:]).port == config.port, name
        assert seconds(service["stop_grace_period"]) > config.grace_seconds, name
        assert any(v.startswith("hf-cache:/cache/huggingface") for v in service["volumes"]), name
        assert "HF_TOKEN" in service["environment"], name
        assert len(gpu_ids(service)) == 1, f"{name}: one GPU per teacher"
        assert any(p.endswith(f":{config.port}") for p in service.get("ports", [])), name


def test_teachers_and_trainer_get_disjoint_gpus():
    runner = pytest.importorskip("deepspeed.launcher.runner", reason="deepspeed not installed")
    doc = compose(MAIN_COMPOSE)
    teacher_gpus = [int(gpu_ids(s)[0]) for s in teachers(doc).values()]
    (trainer,) = trainers(doc).values()
    args = deepspeed_args(command(trainer))
    pool = runner.parse_resource_filter({"localhost": list(range(GPUS_PER_NODE))}, args.include, args.exclude)
    assert len(set(teacher_gpus)) == len(teacher_gpus)
    assert not set(teacher_gpus) & set(pool["localhost"]), (teacher_gpus, pool)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_trainer_service_runs_a_valid_config_against_existing_teachers(path):
    doc = compose(path)
    (trainer,) = trainers(doc).values()
    args = deepspeed_args(command(trainer))
    assert args.module and args.user_script == "student_trainer"
    user = args.user_args
    config_file = host_path(trainer, path, user[user.index("--config") + 1])
    overrides = [a for a in user if "=" in a and not a.startswith("-")]
    config = load_trainer_config(config_file, overrides)  # files inside the container
    assert config.sources, f"{config_file}: no sources"
    output_dir = config.run.output_dir
    assert any(output_dir.startswith(v.split(":")[1]) for v in trainer["volumes"]), \
        f"{output_dir} is not on a volume: checkpoints would die with the container"
    served = teachers(doc)
    if not served:  # the remote trainer: endpoints are whatever the mounted config says
        return
    needed = set()
    for source in config.sources:
        for endpoint in source.endpoints:
            host, _, port = endpoint.removeprefix("dns:///").rpartition(":")
            assert host in served, f"{source.name}: {endpoint} names no teacher service in {path.name}"
            assert int(port) == load_config(overrides=_teacher_flags(served[host])).port, endpoint
            needed.add(host)
    assert {k: v["condition"] for k, v in trainer["depends_on"].items()} == dict.fromkeys(needed, "service_healthy")
