"""deploy/kuberay: a KubeRay RayJob that runs `embedserve prepare --engine ray`.

KubeRay's CRDs are not among kubernetes-validate's schemas, so the RayJob's own fields are checked
here, its command against the CLI's own parser, and its pod templates (plain core/v1 pod templates)
with kubernetes-validate, wrapped as PodTemplate objects.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from embedserve.server.cli import build_parser
from embedserve.server.core.storage import is_url

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
SECRET_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
PLAIN_VARIABLES = {"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"}


def _rayjob() -> dict[str, Any]:
    (document,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    job: dict[str, Any] = document
    return job


def _templates(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The head's and each worker group's pod template, by group."""
    cluster = job["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def _deployment() -> dict[str, Any]:
    for document in yaml.safe_load_all((DEPLOY / "kubernetes" / "deployment.yaml").read_text()):
        if document and document["kind"] == "Deployment":
            deployment: dict[str, Any] = document
            return deployment
    raise AssertionError("deploy/kubernetes has no Deployment")


def test_rayjob_runs_embedserve_prepare_on_the_cluster() -> None:
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "the cluster goes when the corpus is written"
    command = shlex.split(spec["entrypoint"])  # as the job's shell splits it
    assert command[0] == "embedserve"
    args = build_parser({}).parse_args(command[1:])  # the CLI's own parser accepts it
    assert args.command == "prepare"
    assert args.engine == "ray"
    assert not args.ray_address, "the job's RAY_ADDRESS names its cluster"
    assert is_url(args.data_dir)
    assert all(is_url(source) for source in args.inputs)
    # Written where the Deployment serves corpora from.
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    served = container["args"][container["args"].index("--data-dir") + 1]
    assert args.data_dir == served
    cluster = spec["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_pods_run_the_deployments_image_with_secrets_from_secrets() -> None:
    (served,) = _deployment()["spec"]["template"]["spec"]["containers"]
    for group, template in _templates(_rayjob()).items():
        (container,) = template["spec"]["containers"]
        # The Deployment's image built with Ray too (Dockerfile: --build-arg EXTRAS=server,s3,ray).
        repository = served["image"].rsplit(":", 1)[0]
        assert container["image"] == f"{repository}:ray", group
        names = set()
        for variable in container.get("env", []):
            name = variable["name"]
            names.add(name)
            if name in SECRET_VARIABLES:
                assert "value" not in variable, f"{group}: {name} comes from a Secret"
                assert set(variable["valueFrom"]) == {"secretKeyRef"}, f"{group}: {name}"
            else:
                assert name in PLAIN_VARIABLES, f"{group}: {name} is not an S3 client setting"
                assert isinstance(variable.get("value"), str), f"{group}: {name} is a plain value"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, group
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, group


def test_rayjob_pod_templates_are_valid_kubernetes_pod_templates(tmp_path: Path) -> None:
    validate = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    if not Path(validate).exists():
        pytest.skip("kubernetes-validate is not installed (the dev extra installs it)")
    files = []
    for group, template in _templates(_rayjob()).items():
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": group},
            "template": template,
        }
        path = tmp_path / f"{group}.yaml"
        path.write_text(yaml.safe_dump(wrapped))
        files.append(str(path))
    result = subprocess.run([validate, "--strict", "--quiet", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
