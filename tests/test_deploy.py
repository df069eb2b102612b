"""deploy/kubernetes: valid against the Kubernetes schemas, and consistent with the server it runs
(its flags and variables are the server's own, probes and Services point at real ports)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from embedserve.server.config import ServerConfig, env_name, parse_server_config, parse_size
from embedserve.server.core.storage import is_url
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
    server_variables = {env_name(name) for name in ServerConfig.__dataclass_fields__}
    for variable in container.get("env", []):
        if variable["name"].startswith("AWS_"):
            _check_object_store_variable(variable)
        else:
            assert variable["name"] in server_variables
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
    placeholders = {name: "placeholder" for name in secrets if name.startswith("EMBEDSERVE_")}
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

    # Corpora from object storage, through a shard cache on the node's disk that can hold it.
    assert is_url(config.data_dir or ""), "the Deployment serves corpora from object storage"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secrets)
    assert config.cache_dir is not None
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    cache_volumes = set()
    for folder in ("shards", "window-orders"):  # what the server writes under --cache-dir
        mount = mounts[str(config.cache_dir / folder)]
        assert "emptyDir" in volumes[mount["name"]], f"--cache-dir/{folder} is on an emptyDir"
        cache_volumes.add(mount["name"])
    (cache_volume,) = cache_volumes
    assert volumes[cache_volume]["emptyDir"].get("medium") != "Memory", "node disk, not the pod's memory"
    size_limit = _quantity(volumes[cache_volume]["emptyDir"]["sizeLimit"])
    # Above it: the window orders, and a shard being fetched, come on top of the cache.
    assert size_limit > parse_size(config.cache_size), "the emptyDir holds --cache-size of shards"
    requested = _quantity(container["resources"]["requests"]["ephemeral-storage"])
    assert requested >= size_limit, "the scheduler places the pod where its cache fits"


# The S3 client's settings: credentials only from Secrets; the rest is no secret.
AWS_SECRETS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
AWS_SETTINGS = {"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"}


def _check_object_store_variable(variable: dict[str, Any]) -> None:
    name = variable["name"]
    if name in AWS_SECRETS:
        assert "value" not in variable, f"{name} comes from a Secret"
        assert set(variable["valueFrom"]) == {"secretKeyRef"}, f"{name} comes from a Secret"
    else:
        assert name in AWS_SETTINGS, f"{name}: not a setting the S3 client takes from the manifests"
        assert isinstance(variable.get("value"), str), f"{name} is a plain value"


_QUANTITY_SUFFIXES = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6}
_QUANTITY_SUFFIXES |= {"G": 10**9, "T": 10**12}


def _quantity(text: str) -> int:
    """Bytes of a Kubernetes quantity (12Gi, 500M, 1000)."""
    for suffix, factor in _QUANTITY_SUFFIXES.items():
        if text.endswith(suffix):
            return int(float(text.removesuffix(suffix)) * factor)
    return int(text)
