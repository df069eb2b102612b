"""deploy/kubernetes: valid against the Kubernetes schemas, and consistent with the server it runs
(its flags and variables are the server's own, probes and Services point at real ports)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from embedserve.server.config import ServerConfig, env_name, parse_server_config
from embedserve.server.security import check_exposure

yaml = pytest.importorskip("yaml")

KUBERNETES = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def _manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/kubernetes, keyed by kind/name."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") != "Kustomization":
                found[f"{document['kind']}/{document['metadata']['name']}"] = document
    return found


def test_manifests_are_valid_kubernetes_objects() -> None:
    validate = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    if not Path(validate).exists():
        pytest.skip("kubernetes-validate is not installed (the dev extra installs it)")
    files = [str(path) for path in sorted(KUBERNETES.glob("*.yaml")) if path.name != "kustomization.yaml"]
    result = subprocess.run([validate, "--strict", "--quiet", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(Path(file).name for file in files)


def test_manifests_match_the_server() -> None:
    manifests = _manifests()
    deployment = manifests["Deployment/embedserve"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"][0] == "serve"
    config = parse_server_config(container["args"][1:], {})  # the server's own parser accepts them
    for variable in container.get("env", []):
        assert variable["name"] in {env_name(name) for name in ServerConfig.__dataclass_fields__}
    # Secrets come from Secrets, never as values in the manifests; with placeholders for them, the
    # server's own checks let it start (an exposed port has its protection).
    secrets = {
        variable["name"]: variable["valueFrom"]["secretKeyRef"]
        for variable in container["env"]
        if "secretKeyRef" in variable.get("valueFrom", {})
    }
    assert {env_name("api_keys"), env_name("metrics_token")} <= set(secrets)
    for name in (env_name("api_keys"), env_name("metrics_token"), env_name("insecure")):
        assert all(variable["name"] != name or "value" not in variable for variable in container["env"])
    assert secrets[env_name("metrics_token")]["name"] != secrets[env_name("api_keys")]["name"], (
        "Prometheus reads the metrics token, never the API keys"
    )
    placeholders = {name: "placeholder" for name in secrets}
    check_exposure(parse_server_config(container["args"][1:], placeholders))
    # Prometheus scrapes the pod IP: metrics listen beyond loopback, behind the token.
    assert config.metrics_host == "0.0.0.0"
    assert config.metrics_token is None, "the token comes from its Secret, not from the arguments"

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == config.port
    assert (
        ports["metrics"] == config.metrics_port == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # The health port: plaintext and keyless, whatever the main port speaks.
        assert container[probe]["grpc"]["port"] == ports["health"] == config.health_port, probe
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.grace + pause
    assert config.max_connection_age > 0, "connections re-spread over replicas"
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's user
    assert (
        {"cpu", "memory"} <= set(container["resources"]["requests"]) <= set(container["resources"]["limits"])
    )

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    headless = manifests["Service/embedserve-headless"]["spec"]
    assert headless["clusterIP"] == "None", "client-side round_robin needs every pod's address"
    for service in ("embedserve-headless", "embedserve"):
        spec = manifests[f"Service/{service}"]["spec"]
        assert spec["selector"].items() <= labels.items()
        assert {port["targetPort"] for port in spec["ports"]} <= set(ports)
    budget = manifests["PodDisruptionBudget/embedserve"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["minAvailable"] < deployment["spec"]["replicas"], "a drain can still evict a pod"
