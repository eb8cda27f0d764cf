"""Reading docker/k8s/: render a kustomization with the real kustomize (``kubectl kustomize``), pick objects,
expand a container's ``$(VAR)`` arguments, and lay out the files a pod's Secret mounts provide."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import REPO

K8S = REPO / "docker" / "k8s"
# Every entry point a user applies (kubectl apply -k ...).
ENTRY_POINTS = {"paper": K8S / "paper", "secure": K8S / "overlays" / "secure",
                "multinode": K8S / "overlays" / "multinode"}
# The oldest Kubernetes the manifests claim (Job podFailurePolicy is GA in 1.31; native gRPC probes since 1.27)
# and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.31.0", "1.37.0")
# What each Secret the manifests mount holds (docs/DEPLOY.md creates them with these keys).
SECRET_KEYS = {"teacher-tls": ("tls.crt", "tls.key", "ca.crt"), "teacher-token": ("token",), "hf-token": ("token",)}


def _kustomize_version() -> tuple[int, ...] | None:
    if shutil.which("kubectl") is None:
        return None
    out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"Kustomize Version: v(\d+)\.(\d+)", out)
    return tuple(int(x) for x in found.groups()) if found else None


KUSTOMIZE = _kustomize_version()
needs_kustomize = pytest.mark.skipif(
    KUSTOMIZE is None or KUSTOMIZE < (5, 0),
    reason="kustomize >= 5 (built into kubectl >= 1.27) not found: the Kubernetes manifest checks are skipped. "
           "Install kubectl (Google Cloud SDK / Kubernetes apt repository; Debian's kubernetes-client 1.20 is "
           "too old) to run them")


@functools.cache
def _render(path: str) -> str:
    done = subprocess.run(["kubectl", "kustomize", path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kustomize build {path} failed:\n{done.stderr}"
    return done.stdout


def render(path: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k path`` would send (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_render(str(path))) if doc]


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def teachers(docs: list[dict]) -> dict[str, dict]:
    return {n: d for n, d in objects(docs, "Deployment").items()
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "livefuse-teacher"}


def container(workload: dict, name: str) -> dict:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def expanded_args(c: dict) -> list[str]:
    """The container's argv after Kubernetes' ``$(VAR)`` expansion from its literal env values."""
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in c.get("args", [])]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def mounted_files(workload: dict, name: str) -> dict[str, str]:
    """container path -> "secret/<name>/<key>" for every file a Secret volume puts into container ``name`` (the
    Secret's keys: the volume's ``items``, else the keys docs/DEPLOY.md creates it with)."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    files: dict[str, str] = {}
    for mount in container(workload, name).get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" in volume:
            secret = volume["secret"]["secretName"]
            keys = [i["path"] for i in volume["secret"].get("items", [])] or list(SECRET_KEYS[secret])
            files.update({f"{mount['mountPath']}/{k}": f"secret/{secret}/{k}" for k in keys})
    return files


def mount_source(workload: dict, name: str, path: str) -> dict:
    """The volume whose mount in container ``name`` holds ``path``, with the path inside it (``subpath``)."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    for mount in container(workload, name).get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if path == root or path.startswith(root + "/"):
            return {**volumes[mount["name"]], "subpath": os.path.relpath(path, root), "mount": mount}
    raise AssertionError(f"{path} is on no volume of container {name}: it would die with the pod")
