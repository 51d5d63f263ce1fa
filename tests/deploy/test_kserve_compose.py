"""deploy/kserve and deploy/compose.yaml: shape and the facts that tie them to the service.

No KServe CRD schema is bundled anywhere offline, so an InferenceService is checked by structure: the fields
KServe and Knative read, and only container fields Knative accepts; the container itself is validated
against the Kubernetes schema as part of a Pod. Docker is not here either: compose.yaml is parsed and every
host path, port, dependency, health check and memory limit is checked against the files it names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.deploy.test_k8s import (
    K8S_VERSIONS,
    REPO,
    SERVER_STOP_S,
    container,
    image_problems,
    rendered,
    setting_problems,
    settings_from,
)

KSERVE = REPO / "deploy" / "kserve"
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose" / "gpu.yaml"

Obj = dict[str, Any]

# Knative's ContainerMask (knative/serving pkg/apis/serving/fieldmask.go): anything else is refused.
KNATIVE_CONTAINER_FIELDS = {
    "name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy", "livenessProbe",
    "ports", "readinessProbe", "resources", "securityContext", "terminationMessagePath",
    "terminationMessagePolicy", "volumeMounts",
}  # fmt: skip
# KServe's ComponentExtensionSpec.ScaleMetric enum.
SCALE_METRICS = {"concurrency", "rps", "cpu", "memory"}
ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # KServe's InferenceService name pattern

# --- KServe --------------------------------------------------------------------------------------------

VARIANTS = {
    "inferenceservice.yaml": ("cpu", "-cpu"),
    "inferenceservice-gpu.yaml": ("cuda", "-cuda"),
    "inferenceservice-grpc.yaml": ("cpu", "-cpu"),
}


@pytest.fixture(params=sorted(VARIANTS))
def isvc_file(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def isvc(isvc_file: str) -> Obj:
    (doc,) = [d for d in yaml.safe_load_all((KSERVE / isvc_file).read_text()) if d]
    return dict(doc)


def predictor_container(isvc: Obj) -> Obj:
    (container,) = isvc["spec"]["predictor"]["containers"]
    return dict(container)


def attnserve_env(container: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("ATTNSERVE_")}


def test_inference_service_is_a_v2_custom_predictor(isvc_file: str, isvc: Obj) -> None:
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert ISVC_NAME.match(isvc["metadata"]["name"]), isvc["metadata"]["name"]
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] in {"Serverless", "Knative"}, "h2c routing is Knative's"
    container = predictor_container(isvc)
    assert container["name"] == "kserve-container"
    provider, suffix = VARIANTS[isvc_file]
    assert image_problems(container["image"], suffix) == []
    env = attnserve_env(container)
    assert setting_problems(env) == []
    settings = settings_from(env)
    assert settings.provider == provider
    # Custom predictors declare their protocol in the PROTOCOL variable (predictor_custom.go).
    assert {"name": "PROTOCOL", "value": "v2"} in container["env"]
    # Knative takes one port: REST (http1, KServe's default) by default; the name h2c routes plaintext HTTP/2 (gRPC).
    if "grpc" in isvc_file:
        assert container["ports"] == [{"name": "h2c", "containerPort": settings.grpc_port, "protocol": "TCP"}]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == settings.grpc_port, probe
    else:
        assert container["ports"] == [{"name": "http1", "containerPort": settings.http_port, "protocol": "TCP"}]
        for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
            assert container[probe]["httpGet"] == {"path": path, "port": settings.http_port}, probe
    assert set(container) <= KNATIVE_CONTAINER_FIELDS, f"Knative refuses {set(container) - KNATIVE_CONTAINER_FIELDS}"


def test_inference_service_scales_and_exposes_metrics(isvc_file: str, isvc: Obj) -> None:
    predictor = isvc["spec"]["predictor"]
    assert predictor["scaleMetric"] in SCALE_METRICS
    assert isinstance(predictor["scaleTarget"], int) and predictor["scaleTarget"] > 0
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"], "min 1: a cold start pays the warm-up"
    settings = settings_from(attnserve_env(predictor_container(isvc)))
    assert predictor["annotations"]["prometheus.kserve.io/port"] == str(settings.metrics_port)
    assert predictor["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
    # Tolerations and nodeSelector need Knative feature flags: documented in the file, not set.
    assert not {"tolerations", "nodeSelector", "terminationGracePeriodSeconds"} & set(predictor)
    assert predictor["enableServiceLinks"] is False


def test_inference_service_bounds_calls_per_pod_and_mounts_no_token(isvc: Obj) -> None:
    predictor = isvc["spec"]["predictor"]
    settings = settings_from(attnserve_env(predictor_container(isvc)))
    limit = predictor["containerConcurrency"]
    assert isinstance(limit, int), f"containerConcurrency {limit!r}"
    # Knative's hard limit per pod is the service's queue bound: past it the server sheds anyway.
    assert limit == settings.max_queue_requests, f"containerConcurrency {limit} vs {settings.max_queue_requests}"
    # Over the soft target, or Knative lowers the target to it; within what gRPC itself admits.
    assert predictor["scaleTarget"] < limit <= settings.max_concurrent_rpcs
    assert predictor["automountServiceAccountToken"] is False, "the server never calls the Kubernetes API"


def test_inference_service_container_is_a_valid_locked_down_kubernetes_container(isvc_file: str, isvc: Obj) -> None:
    container = predictor_container(isvc)
    predictor = isvc["spec"]["predictor"]
    pod_fields = ("enableServiceLinks", "automountServiceAccountToken")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": isvc["metadata"]["name"]},
        "spec": {"containers": [container], **{field: predictor[field] for field in pod_fields}},
    }
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    limits = container["resources"]["limits"]
    settings = settings_from(attnserve_env(container))  # thread counts default to the CPU limit; set ones fit it
    assert settings.intra_op_threads <= int(limits["cpu"]) and settings.engine_workers <= int(limits["cpu"])
    assert ("nvidia.com/gpu" in limits) == (VARIANTS[isvc_file][0] == "cuda")
    if "nvidia.com/gpu" in limits:
        assert int(limits["nvidia.com/gpu"]) == 1


# --- docker compose --------------------------------------------------------------------------------------


def compose() -> Obj:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def seconds(duration: str) -> float:
    """A compose duration: 40s, 2m, 1m30s."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"unreadable duration {duration!r}"
    return int(parts.group(1) or 0) * 60 + float(parts.group(2) or 0)


COMPOSE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}  # Docker's and Podman's --memory: binary
K8S_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def compose_bytes(size: str) -> int:
    """A compose memory size: 512m, 4g, 1gb."""
    match = re.fullmatch(r"(\d+)([kmg]?)b?", str(size).lower())
    assert match, f"unreadable size {size!r}"
    return int(match.group(1)) * COMPOSE_UNITS[match.group(2)]


def k8s_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity: 4Gi, 512Mi, 4G."""
    match = re.fullmatch(r"(\d+)([a-zA-Z]*)", quantity)
    assert match and match.group(2) in K8S_UNITS, f"unreadable quantity {quantity!r}"
    return int(match.group(1)) * K8S_UNITS[match.group(2)]


def mounts(service: Obj) -> dict[str, Path]:
    """Container path -> host path of each bind mount (short syntax, relative to deploy/)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("."), f"{volume}: a bind mount relative to compose.yaml"
        out[target] = (DEPLOY / source).resolve()
    return out


def test_compose_mounts_and_builds_only_what_exists() -> None:
    services = compose()["services"]
    assert set(services) == {"attnserve", "prometheus", "grafana"}
    for name, service in services.items():
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
        image = service["image"]
        assert ":" in image.rpartition("/")[2] and not image.endswith(":latest"), f"{name}: pin {image}"
    build = services["attnserve"]["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO
    assert build["args"] == {"PROVIDER": "cpu"} and "target" not in build  # the last stage: the runtime
    assert image_problems(services["attnserve"]["image"], "-cpu") == []


def test_dockerfile_has_the_compose_providers() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = set(re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", dockerfile))
    assert {"base-cpu", "base-cuda"} <= stages, f"compose builds PROVIDER cpu and cuda; stages: {sorted(stages)}"
    assert re.search(r"(?m)^ARG PROVIDER=cpu$", dockerfile)


def test_compose_service_drains_and_reports_health() -> None:
    service = compose()["services"]["attnserve"]
    env = {key: str(value) for key, value in service["environment"].items()}
    assert setting_problems(env) == []
    settings = settings_from(env)
    assert service["ports"] == [f"{p}:{p}" for p in (settings.http_port, settings.grpc_port, settings.metrics_port)]
    assert seconds(service["stop_grace_period"]) > settings.drain_grace_s + SERVER_STOP_S, "SIGKILL mid-drain"
    health = service["healthcheck"]
    probe = ["CMD", "python", "-m", "service.app.healthcheck", "--address", f"127.0.0.1:{settings.grpc_port}"]
    assert health["test"] == probe
    assert seconds(health["start_period"]) >= 60, "warm-up happens before SERVING"
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"] and "/tmp" in service["tmpfs"]


def test_compose_prometheus_loads_our_config_and_scrapes_the_service() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["depends_on"]["attnserve"]["condition"] == "service_healthy"
    (flag,) = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    config_path = flag.removeprefix("--config.file=")
    mounted = mounts(prometheus)
    assert mounted[config_path] == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(mounted[config_path].read_text())
    for rule_file in config["rule_files"]:  # relative to the config file, inside the container too
        assert mounted[str(Path(config_path).parent / rule_file)] == DEPLOY / "prometheus" / rule_file
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, _, target_port = target.partition(":")
    env = {key: str(value) for key, value in services[host]["environment"].items()}
    assert int(target_port) == settings_from(env).metrics_port
    assert "--enable-feature=exemplar-storage" in prometheus["command"], "the request ids on the histograms"


def test_compose_grafana_is_provisioned_from_the_repository() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    mounted = mounts(grafana)
    provisioning = mounted["/etc/grafana/provisioning"]
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "attnserve.yaml").read_text())["providers"]
    assert mounted[provider["options"]["path"]] == DEPLOY / "grafana" / "dashboards"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname in services and url.hostname == "prometheus"
    assert f"{url.port}:{url.port}" in services["prometheus"]["ports"]


def test_compose_gpu_override_builds_and_runs_cuda() -> None:
    service = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["attnserve"]
    assert service["build"] == {"args": {"PROVIDER": "cuda"}}
    assert image_problems(service["image"], "-cuda") == []
    assert settings_from({k: str(v) for k, v in service["environment"].items()}).provider == "cuda"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1


def overlay_memory_limit(overlay: str) -> int:
    docs = [doc for doc in yaml.safe_load_all(rendered(overlay)) if doc]
    return k8s_bytes(container(docs)["resources"]["limits"]["memory"])


def test_compose_services_have_memory_limits() -> None:
    services = compose()["services"]
    limits = {name: compose_bytes(service["mem_limit"]) for name, service in services.items()}
    for name, service in services.items():
        # One way of saying it: with deploy.resources.limits.memory too, compose requires the two to agree.
        assert "limits" not in service.get("deploy", {}).get("resources", {}), f"{name}: mem_limit only"
    # The service gets what a pod gets on Kubernetes; the GPU override what a GPU pod gets.
    assert limits["attnserve"] == overlay_memory_limit("cpu")
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["attnserve"]
    assert compose_bytes(gpu["mem_limit"]) == overlay_memory_limit("gpu")
    assert "limits" not in gpu["deploy"]["resources"]
    for name in ("prometheus", "grafana"):
        assert 256 * 2**20 <= limits[name] <= limits["attnserve"], f"{name}: mem_limit {services[name]['mem_limit']}"
