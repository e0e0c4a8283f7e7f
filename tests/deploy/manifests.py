"""Build deploy/kubernetes as `kubectl apply -k` would, and run its container as a kubelet would:
env from a Secret's data, Secret volumes laid out the way the kubelet writes them."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import ROOT

BASE = ROOT / "deploy" / "kubernetes" / "base"
COMPONENTS = ROOT / "deploy" / "kubernetes" / "components"
#: A recent Kubernetes whose schemas kubernetes-validate bundles.
KUBERNETES_VERSION = "1.32.0"
#: Every deploy test builds with kubectl's built-in kustomize.
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="needs kubectl (with its built-in kustomize)"
)


def build(path: Path = BASE) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {obj["kind"]: obj for obj in objects}
    assert len(kinds) == len(objects), "one object of each kind"
    return kinds


def overlay(tmp_path: Path, components: tuple[str, ...], **more: Any) -> list[dict[str, Any]]:
    """A user's overlay: the base and `components`, in that order, and `more` fields."""
    directory = tmp_path / ("overlay-" + "-".join(components or ("none",)))
    directory.mkdir()
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(BASE, directory)],
                "components": [os.path.relpath(COMPONENTS / c, directory) for c in components],
                **more,
            }
        )
    )
    return build(directory)


def secret_env(container: dict[str, Any], secrets: dict[str, dict[str, bytes]]) -> dict[str, str]:
    """The container's env, its secretKeyRefs resolved in `secrets` (name -> data)."""
    env = {}
    for variable in container["env"]:
        ref = variable["valueFrom"]["secretKeyRef"]
        env[variable["name"]] = secrets[ref["name"]][ref["key"]].decode()
    return env


_generation = itertools.count()


def project_secret(directory: Path, volume: dict[str, Any], data: dict[str, bytes]) -> None:
    """Write (or update) a Secret volume as the kubelet does: the files in a fresh hidden
    directory, `..data` swapped atomically to point at it, each item a symlink through `..data`.
    So an update changes every file at once, and each visible path resolves to a new inode."""
    items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
    fresh = directory / f"..generation_{next(_generation)}"
    fresh.mkdir(parents=True)
    for item in items:
        target = fresh / item["path"]
        target.write_bytes(data[item["key"]])
        target.chmod(item.get("mode", volume["secret"].get("defaultMode", 0o644)))
    link = directory / "..data_tmp"
    link.symlink_to(fresh.name)
    previous = (directory / "..data").resolve() if (directory / "..data").exists() else None
    link.replace(directory / "..data")
    for item in items:
        visible = directory / item["path"]
        if not visible.is_symlink():
            visible.symlink_to(Path("..data") / item["path"])
    if previous is not None:
        for old in previous.iterdir():
            old.unlink()
        previous.rmdir()
