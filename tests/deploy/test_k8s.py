"""docker/k8s/: every entry point renders with the real kustomize and passes kubernetes-validate (strict, two
Kubernetes versions); the teachers' and the trainer's commands parse with the real CLIs; probes ask the health
service the teacher registers (NOT_SERVING while loading, shown on a real server); Secrets sit where the flags
say; the trainer's endpoints name the headless Services; the multi-node Job's torchrun keeps the paper's batch.

No cluster runs here: these checks read the rendered objects (tests/deploy/k8s.py).
"""

from __future__ import annotations

import os

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from student_trainer.__main__ import main as train_main
from student_trainer.trainer.config import load_trainer_config
from teacher_server import healthcheck
from teacher_server.__main__ import build_parser as teacher_parser
from teacher_server.background import BackgroundServer
from teacher_server.config import load_config
from tests import REPO

from .k8s import (
    ENTRY_POINTS,
    K8S_VERSIONS,
    container,
    expanded_args,
    mount_source,
    mounted_files,
    needs_kustomize,
    objects,
    render,
    selects,
    teachers,
)

pytestmark = needs_kustomize
PAPER_MODELS = {"meta-llama/Llama-2-7b-hf", "openlm-research/open_llama_7b_v2", "mosaicml/mpt-7b"}
PAPER_BATCH = 128  # sequences per optimizer step (FuseLLM)


# --- schema -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_object_passes_kubernetes_validate(entry, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(ENTRY_POINTS[entry])
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_the_validator_rejects_a_misspelt_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = next(iter(teachers(render(ENTRY_POINTS["paper"])).values()))
    spec = deployment["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriodSecond"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


# --- teachers ---------------------------------------------------------------------------------------------------

def _teacher_config(deployment: dict):
    args = vars(teacher_parser().parse_args(expanded_args(container(deployment, "teacher"))))
    args.pop("config")
    return load_config(overrides=args)  # flags parse (SystemExit on an unknown one) and validate


def _probe_window(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_teachers_run_the_cli_on_one_gpu_with_a_grace_period_over_the_drain(entry):
    deployments = teachers(render(ENTRY_POINTS[entry]))
    assert {_teacher_config(d).model for d in deployments.values()} == PAPER_MODELS
    for name, deployment in deployments.items():
        config, pod = _teacher_config(deployment), deployment["spec"]["template"]
        c = container(deployment, "teacher")
        assert config.device == "cuda", f"{name}: a 7B teacher must not fall back to CPU"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert c["image"].split(":")[0].endswith("livefuse-teacher"), name
        assert pod["spec"]["terminationGracePeriodSeconds"] > config.grace_seconds, name
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": config.port, "metrics": config.metrics_port}, name
        notes = pod["metadata"]["annotations"]
        assert (notes["prometheus.io/scrape"], notes["prometheus.io/port"]) == ("true", str(config.metrics_port))
        assert mount_source(deployment, "teacher", "/cache/huggingface/hub")["persistentVolumeClaim"]
        assert _probe_window(c["startupProbe"]) >= 30 * 60, f"{name}: a 13 GB download needs time"
        spec = deployment["spec"]
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name


@pytest.mark.parametrize("entry", ["paper", "multinode"])
def test_plain_teachers_use_native_grpc_probes_on_the_teacher_health_service(entry):
    for name, deployment in teachers(render(ENTRY_POINTS[entry])).items():
        config, c = _teacher_config(deployment), container(deployment, "teacher")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[kind]["grpc"] == {"port": config.port, "service": healthcheck.TEACHER_SERVICE}, (name, kind)


def test_secure_teachers_get_tls_and_token_from_secrets_and_probe_with_them():
    docs = render(ENTRY_POINTS["secure"])
    for name, deployment in teachers(docs).items():
        config, c = _teacher_config(deployment), container(deployment, "teacher")
        files = mounted_files(deployment, "teacher")
        assert files.get(config.tls_cert) == "secret/teacher-tls/tls.crt", name
        assert files.get(config.tls_key) == "secret/teacher-tls/tls.key", name
        assert files.get(config.auth_token_file) == "secret/teacher-token/token", name
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            # the kubelet's gRPC probe speaks neither TLS nor a token: the image's probe does, with the same files
            assert "grpc" not in c[kind], (name, kind)
            argv = c[kind]["exec"]["command"]
            assert argv[:3] == ["python", "-m", "teacher_server.healthcheck"]
            probe = healthcheck.build_parser().parse_args(argv[3:])
            assert probe.port == config.port and probe.service == healthcheck.TEACHER_SERVICE
            assert files.get(probe.tls_ca) == "secret/teacher-tls/ca.crt"
            assert files.get(probe.auth_token_file) == "secret/teacher-token/token"


def test_the_probed_service_is_not_serving_while_the_model_loads(tiny_model_dirs):
    """What the probes ask (service livefuse.v1.Teacher) is what a real teacher answers NOT_SERVING for until
    its model is loaded: a replica joins the Service's DNS answer only once it can score."""
    (deployment, *_) = teachers(render(ENTRY_POINTS["paper"])).values()
    probe = container(deployment, "teacher")["readinessProbe"]["grpc"]
    config = load_config(overrides={"model": str(tiny_model_dirs["gpt2"]), "host": "127.0.0.1", "port": 0,
                                    "metrics_port": None, "device": "cpu", "log_format": "text", "warmup": False})
    server = BackgroundServer(config, load=False).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                return stub.Check(health_pb2.HealthCheckRequest(service=probe["service"]), timeout=10).status

            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            server.load()
            assert status() == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_each_source_has_one_headless_service_over_its_own_ready_replicas(entry):
    docs = render(ENTRY_POINTS[entry])
    services = objects(docs, "Service")
    for name, deployment in teachers(docs).items():
        service = services[name]  # same name: the trainer's endpoint does not change when the model does
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["clusterIP"] == "None" and not service["spec"].get("publishNotReadyAddresses")
        assert selects(service["spec"]["selector"], pod_labels), name
        others = [n for n, d in teachers(docs).items()
                  if n != name and selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert not others, f"{name}'s Service also selects {others}"
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["port"] == _teacher_config(deployment).port and grpc_port["targetPort"] == "grpc"


def test_scaling_or_swapping_a_source_leaves_its_service_and_the_trainer_alone(tmp_path):
    overlay = tmp_path / "scaled"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(ENTRY_POINTS["paper"], overlay)],
        "replicas": [{"name": "teacher-llama2", "count": 4}],
        "images": [{"name": "livefuse-teacher", "newName": "registry.example.com/livefuse-teacher", "newTag": "v2"}],
    }))
    before, after = render(ENTRY_POINTS["paper"]), render(overlay)
    assert teachers(after)["teacher-llama2"]["spec"]["replicas"] == 4
    assert container(teachers(after)["teacher-mpt"], "teacher")["image"] == "registry.example.com/livefuse-teacher:v2"
    assert objects(after, "Service") == objects(before, "Service")
    assert objects(after, "Job") == objects(before, "Job") and objects(after, "ConfigMap") == objects(before, "ConfigMap")


# --- trainer ----------------------------------------------------------------------------------------------------

def _trainer(docs: list[dict]) -> tuple[dict, dict]:
    (job,) = objects(docs, "Job").values()
    return job, container(job, "trainer")


def _trainer_config(docs: list[dict], job: dict, argv: list[str], tmp_path):
    """The trainer config the Job's pod reads: its --config file from the generated ConfigMap it mounts, plus the
    key=value overrides; files the overrides name are laid out as the pod's Secret mounts provide them."""
    config_path = argv[argv.index("--config") + 1]
    volume = mount_source(job, "trainer", config_path)
    configmap = objects(docs, "ConfigMap")[volume["configMap"]["name"]]
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(configmap["data"][volume["subpath"]])
    files = mounted_files(job, "trainer")
    overrides = [a for a in argv[argv.index("--config") + 2:] if "=" in a and not a.startswith("-")]
    for path in files:
        (tmp_path / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path.lstrip("/")).write_text("x")
    local = [a.replace(" /etc/", f" {tmp_path}/etc/").replace("=/etc/", f"={tmp_path}/etc/") for a in overrides]
    return load_trainer_config(run_yaml, local), overrides, files


def _endpoint_service(endpoint: str) -> tuple[str, str, int]:
    """``dns:///name.namespace.svc:port`` -> (name, namespace, port)."""
    assert endpoint.startswith("dns:///"), f"{endpoint}: one DNS name per source (gRPC re-resolves it)"
    host, _, port = endpoint.removeprefix("dns:///").rpartition(":")
    name, namespace, svc = host.split(".", 2)
    assert svc in ("svc", "svc.cluster.local"), endpoint
    return name, namespace, int(port)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_trainer_endpoints_name_the_teacher_services(entry, tmp_path):
    docs = render(ENTRY_POINTS[entry])
    job, c = _trainer(docs)
    argv = c["args"]
    config, _, _ = _trainer_config(docs, job, argv, tmp_path)
    services, deployments = objects(docs, "Service"), teachers(docs)
    used = set()
    for source in config.sources:
        (endpoint,) = source.endpoints
        name, namespace, port = _endpoint_service(endpoint)
        assert name in deployments, f"{source.name}: {endpoint} names no teacher Service"
        assert namespace == services[name]["metadata"]["namespace"] == job["metadata"]["namespace"]
        assert port == _teacher_config(deployments[name]).port
        used.add(name)
    assert used == set(deployments), "a teacher no source uses"
    startup = max(_probe_window(container(d, "teacher")["startupProbe"]) for d in deployments.values())
    assert config.run.connect_timeout_s >= startup, "the trainer gives up before a teacher can be ready"
    out = mount_source(job, "trainer", config.run.output_dir)
    assert out["persistentVolumeClaim"]["claimName"] == "checkpoints" and not out["mount"].get("readOnly")
    for data_file in config.data.train_files + config.data.validation_files:
        assert mount_source(job, "trainer", data_file)["persistentVolumeClaim"]


def test_single_node_job_runs_deepspeed_on_all_its_gpus(tmp_path):
    runner = pytest.importorskip("deepspeed.launcher.runner", reason="deepspeed (livefuse[train]) not installed")
    docs = render(ENTRY_POINTS["paper"])
    job, c = _trainer(docs)
    assert "command" not in c, "the image's ENTRYPOINT (deepspeed) runs"
    args = runner.parse_args(c["args"])
    assert args.module and args.user_script == "student_trainer"
    assert args.num_gpus == c["resources"]["limits"]["nvidia.com/gpu"] == 8
    config, _, _ = _trainer_config(docs, job, args.user_args, tmp_path)
    ds = config.train.deepspeed
    assert args.num_gpus * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == PAPER_BATCH


def test_multinode_job_is_torchrun_over_an_indexed_job_with_the_papers_batch(tmp_path):
    torchrun = pytest.importorskip("torch.distributed.run")
    docs = render(ENTRY_POINTS["multinode"])
    job, c = _trainer(docs)
    assert c["command"] == ["torchrun"]
    args = torchrun.get_args_parser().parse_args(c["args"])
    nodes, gpus = int(args.nnodes), int(args.nproc_per_node)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes == 2
    assert gpus == c["resources"]["limits"]["nvidia.com/gpu"]
    assert args.module and args.training_script == "student_trainer" and args.rdzv_backend == "c10d"
    host, _, port = args.rdzv_endpoint.rpartition(":")
    pod = spec["template"]
    assert host == f"{job['metadata']['name']}-0.{pod['spec']['subdomain']}", "rendezvous on pod 0 (index 0)"
    service = objects(docs, "Service")[pod["spec"]["subdomain"]]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert int(port) in [p["containerPort"] for p in c["ports"]]
    config, _, _ = _trainer_config(docs, job, args.training_script_args, tmp_path)
    ds = config.train.deepspeed
    assert nodes * gpus * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == PAPER_BATCH


def test_secure_trainer_reads_the_ca_and_token_the_teachers_use(tmp_path):
    docs = render(ENTRY_POINTS["secure"])
    job, c = _trainer(docs)
    config, overrides, files = _trainer_config(docs, job, c["args"], tmp_path)
    assert overrides, "the secure overlay sets TLS and the token by key=value overrides"
    for source in config.sources:
        assert source.tls is not None and source.auth_token_file is not None, source.name
        container_ca = "/" + os.path.relpath(source.tls.ca_cert, tmp_path)
        container_token = "/" + os.path.relpath(source.auth_token_file, tmp_path)
        assert files[container_ca] == "secret/teacher-tls/ca.crt" and files[container_token] == "secret/teacher-token/token"
    assert "secret/teacher-tls/tls.key" not in files.values(), "the trainer needs the CA, not the teachers' key"


def test_job_failure_policy_matches_the_cli_exit_codes(tmp_path):
    """Exit 2 (bad config) fails the Job at once — retrying cannot help; other failures retry (and resume)."""
    job, _ = _trainer(render(ENTRY_POINTS["paper"]))
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
    fail_codes = {code for rule in spec["podFailurePolicy"]["rules"] if rule["action"] == "FailJob"
                  for code in rule["onExitCodes"]["values"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: {model: m}\nrun: {output_dir: out}\ndata: {train_files: [missing.txt]}\n")
    assert fail_codes == {train_main(["--config", str(bad)])} == {2}
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 300, "time to save a checkpoint on SIGTERM"


def test_the_cluster_config_is_the_papers_config_with_cluster_endpoints():
    """docker/k8s/trainer/run.yaml repeats configs/paper_llama2.yaml for the cluster: only endpoints and run
    settings may differ, so the two cannot drift apart."""
    paper = load_trainer_config(REPO / "configs" / "paper_llama2.yaml")
    cluster = load_trainer_config(REPO / "docker" / "k8s" / "trainer" / "run.yaml")
    for section in ("target", "method", "train"):
        assert getattr(cluster, section) == getattr(paper, section), section
    where = {"dataset", "cache_dir"}  # the cluster reads a copy of the hub dataset from a volume
    assert cluster.data.model_dump(exclude=where) == paper.data.model_dump(exclude=where)
    assert cluster.data.dataset.startswith("/data/") and cluster.data.cache_dir.startswith("/cache/")
    strip = [s.model_dump(exclude={"endpoints"}) for s in paper.sources]
    assert [s.model_dump(exclude={"endpoints"}) for s in cluster.sources] == strip
    assert cluster.run.output_dir == paper.run.output_dir
