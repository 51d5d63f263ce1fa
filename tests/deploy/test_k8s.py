"""deploy/k8s: each overlay renders, passes kubernetes-validate --strict, and holds what the service needs.

`kubectl kustomize` renders deploy/k8s/overlays/{cpu,gpu}; kubernetes-validate checks every built-in object
offline against the bundled schemas of the oldest Kubernetes we support (1.30: native preStop sleep) and the
newest it knows. It only warns about kinds it has no schema for, so the test requires those warnings to name
exactly the prometheus-operator kinds, which are checked here by structure instead. The rest ties the
manifests to the service: probes speak gRPC health on the gRPC port, the pod outlives the drain, every
ConfigMap key is a real setting with a valid value, the NetworkPolicy lets only the pods' namespace reach gRPC
and only the monitoring namespace reach /metrics, and the monitoring matches deploy/prometheus.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.app.settings import Settings
from service.observe.metrics import SERVICE_METRICS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
PROMETHEUS = REPO / "deploy" / "prometheus"
OVERLAYS = ("cpu", "gpu")
# kubernetes-validate 1.37.0 bundles schemas up to 1.37; 1.30 is the oldest cluster these manifests target.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # prometheus-operator's: no schema in kubernetes-validate
SERVER_STOP_S = 1.0  # AttnServer.stop: server.stop(grace=1.0) after the drain
PREFIX = "ATTNSERVE_"
NAMESPACE = "attnserve"  # where the READMEs apply the overlays (-n attnserve)

Obj = dict[str, Any]


# --- helpers (tests/deploy/test_kserve_compose.py uses the settings ones too) ------------------------------


def setting_problems(env: Mapping[str, str]) -> list[str]:
    """What is wrong with these ATTNSERVE_* variables: keys that are no Settings field, values it refuses."""
    problems = [
        f"{key}: no field {key.removeprefix(PREFIX).lower()!r} in service.app.settings.Settings"
        for key in env
        if not key.startswith(PREFIX) or key.removeprefix(PREFIX).lower() not in Settings.model_fields
    ]
    if not problems:
        try:
            settings_from(env)
        except ValueError as e:  # pydantic's ValidationError
            problems.append(str(e))
    return problems


def settings_from(env: Mapping[str, str]) -> Settings:
    """The Settings these variables give, defaults elsewhere; this process's environment is not read."""
    return Settings.model_validate({key.removeprefix(PREFIX).lower(): value for key, value in env.items()})


def image_problems(image: str, suffix: str) -> list[str]:
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return [f"{image}: no tag"]
    if tag == "latest":
        return [f"{image}: :latest"]
    return [] if tag.endswith(suffix) else [f"{image}: tag does not end in {suffix}"]


# --- rendering ---------------------------------------------------------------------------------------------


@functools.cache
def rendered(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not on PATH: the deploy tests need it (kubectl kustomize), they do not skip"
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(overlay: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(rendered(overlay)) if doc]


def one(docs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[Obj]) -> Obj:
    (only,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(only)


def settings_env(docs: list[Obj]) -> dict[str, str]:
    """The ConfigMap the container takes its environment from."""
    (source,) = container(docs)["envFrom"]
    return dict(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])


def port(c: Obj, name: str) -> int:
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return int(number)


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- schema validation -------------------------------------------------------------------------------------


def test_overlay_passes_kubernetes_validate_strict(overlay: str, docs: list[Obj], tmp_path: Path) -> None:
    manifest = tmp_path / f"{overlay}.yaml"  # a file: with several -k, a second read of stdin finds it closed
    manifest.write_text(rendered(overlay))
    versions = [arg for v in K8S_VERSIONS for arg in ("-k", v)]
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *versions, str(manifest)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "ERROR" not in out and "FATAL" not in out, out
    for version in (v.rsplit(".", 1)[0] for v in K8S_VERSIONS):
        passed = set(re.findall(rf"passed for resource (\S+) against version {re.escape(version)}\b", out))
        builtin = {f"{d['kind'].lower()}/{d['metadata']['name']}" for d in docs if d["kind"] not in CRD_KINDS}
        assert passed == builtin, f"Kubernetes {version}: validated {sorted(passed)}, expected {sorted(builtin)}"
        unknown = set(re.findall(rf"schema for kind (\S+) with api version \S+ for kubernetes version {version}", out))
        assert unknown == CRD_KINDS, f"kinds without a schema (a typo in apiVersion or kind?): {sorted(unknown)}"


# --- the pod ---------------------------------------------------------------------------------------------


def test_probes_call_grpc_health_on_the_grpc_port(docs: list[Obj]) -> None:
    c = container(docs)
    env = settings_env(docs)
    grpc_port = port(c, "grpc")
    assert grpc_port == settings_from(env).grpc_port, "container port grpc vs ATTNSERVE_GRPC_PORT"
    assert port(c, "metrics") == settings_from(env).metrics_port, "container port metrics vs ATTNSERVE_METRICS_PORT"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        handlers = set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"}
        assert handlers == {"grpc"}, f"{probe}: {handlers}"
        assert c[probe]["grpc"]["port"] == grpc_port, probe
        assert c[probe]["grpc"].get("service", "") == "", f"{probe}: the server's overall health is service ''"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "start-up budget under 2 min for warm-up"


def prestop_sleep_s(c: Obj) -> float:
    pre_stop = c["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    match = re.search(r"time\.sleep\(([\d.]+)\)", " ".join(pre_stop["exec"]["command"]))
    assert match, f"preStop is neither a sleep nor python's time.sleep: {pre_stop}"
    return float(match.group(1))


def test_pod_outlives_endpoint_removal_and_drain(docs: list[Obj]) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    sleep_s = prestop_sleep_s(container(docs))
    drain_s = settings_from(settings_env(docs)).drain_grace_s
    assert sleep_s >= 3, "preStop sleep too short for endpoint removal to reach proxies"
    needed = sleep_s + drain_s + SERVER_STOP_S
    assert pod["terminationGracePeriodSeconds"] > needed, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} <= preStop {sleep_s} + drain "
        f"{drain_s} + stop {SERVER_STOP_S}: kubelet would SIGKILL in-flight requests"
    )


def test_pod_runs_locked_down(docs: list[Obj]) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    security = container(docs)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Service links would inject ATTNSERVE_<SERVICE>_PORT=tcp://... for Services named attnserve-*.
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp under the read-only root"


def test_settings_are_real_and_fit_the_cpu_limit(overlay: str, docs: list[Obj]) -> None:
    env = settings_env(docs)
    assert setting_problems(env) == []
    settings = settings_from(env)
    cpus = int(container(docs)["resources"]["limits"]["cpu"])
    # Thread counts default to the cgroup CPU quota (service/host/cpu_quota.py); set ones must fit the limit.
    assert 0 <= settings.intra_op_threads <= cpus
    assert 0 <= settings.engine_workers <= cpus
    assert settings.provider == {"cpu": "cpu", "gpu": "cuda"}[overlay]


def test_resources_and_image_per_variant(overlay: str, docs: list[Obj]) -> None:
    c = container(docs)
    resources = c["resources"]
    for kind in ("cpu", "memory"):
        assert resources["requests"][kind] == resources["limits"][kind], f"{kind}: requests = limits (Guaranteed)"
    assert image_problems(c["image"], {"cpu": "-cpu", "gpu": "-cuda"}[overlay]) == []
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    if overlay == "gpu":
        assert int(resources["limits"]["nvidia.com/gpu"]) == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert pod["nodeSelector"]
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
        assert "tolerations" not in pod and "nodeSelector" not in pod


# --- Services, disruption budget, autoscaling ------------------------------------------------------------


def test_services_name_their_ports(docs: list[Obj]) -> None:
    c = container(docs)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service", "attnserve")["spec"]
    headless = one(docs, "Service", "attnserve-headless")["spec"]
    assert service["type"] == "ClusterIP" and headless["clusterIP"] == "None"
    for spec in (service, headless):
        assert selects(spec["selector"], pod_labels)
        for p in spec["ports"]:
            assert p["port"] == port(c, p["targetPort"]), p
    assert {p["name"]: p.get("appProtocol") for p in service["ports"]} == {
        "http": "http",
        "grpc": "kubernetes.io/h2c",
        "metrics": "http",
    }
    assert [p["name"] for p in headless["ports"]] == ["grpc"], "headless: gRPC only (one scrape per pod)"
    assert headless["ports"][0]["appProtocol"] == "kubernetes.io/h2c"


def test_disruption_budget_covers_the_pods(docs: list[Obj]) -> None:
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["selector"]["matchLabels"], pod_labels)
    assert pdb["maxUnavailable"] == 1


# --- network policy ---------------------------------------------------------------------------------------


def monitoring_namespace() -> str:
    """The namespace k8s/README.md installs kube-prometheus-stack into: the one the policy must admit."""
    match = re.search(r"helm upgrade --install kube-prometheus-stack \S+ -n (\S+)", (K8S / "README.md").read_text())
    assert match, "k8s/README.md: no kube-prometheus-stack install line"
    return match.group(1)


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions); {} selects everything."""
    if not selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        found = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not found:
            return False
    return True


def peer_admits(peer: Obj, namespace: str, pod_labels: Mapping[str, str]) -> bool:
    """Whether one `from` entry admits a pod with these labels in this namespace."""
    if "ipBlock" in peer:
        return True  # pod IPs may fall in any block: count it as admitting everyone
    namespace_labels = {"kubernetes.io/metadata.name": namespace}  # on every namespace since Kubernetes 1.22
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], namespace_labels):
            return False
    elif namespace != NAMESPACE:
        return False  # a podSelector alone selects pods of the policy's own namespace
    return matches(peer.get("podSelector", {}), pod_labels)


def rule_port_opens(rule_port: Obj, name: str, number: int) -> bool:
    """Whether one NetworkPolicyPort covers the TCP container port of this name and number."""
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in rule_port or rule_port["port"] in (name, number):
        return True  # no port: every port of the protocol
    value = rule_port["port"]
    return isinstance(value, int) and value <= number <= rule_port.get("endPort", value)


def ingress_allowed(policy: Obj, c: Obj, port_name: str, namespace: str, pod_labels: Mapping[str, str]) -> bool:
    """Whether the policy lets such a pod reach the container port of this name (NetworkPolicy semantics)."""
    number = port(c, port_name)
    for rule in policy["spec"].get("ingress", []):
        opens = any(rule_port_opens(p, port_name, number) for p in rule.get("ports") or [{}])  # none: every port
        peers = rule.get("from") or [{"ipBlock": "any"}]  # no peers: every source
        if opens and any(peer_admits(peer, namespace, pod_labels) for peer in peers):
            return True
    return False


def test_network_policy_selects_the_pods_and_restricts_ingress(docs: list[Obj]) -> None:
    policy = one(docs, "NetworkPolicy")
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    deployment = one(docs, "Deployment")["spec"]
    selector = policy["spec"]["podSelector"]
    assert matches(selector, deployment["template"]["metadata"]["labels"]), "the policy misses the attnserve pods"
    # The Deployment's own selector, no wider: {} would lock down every other pod of the namespace too.
    assert selector == {"matchLabels": deployment["selector"]["matchLabels"]}
    assert policy["spec"]["policyTypes"] == ["Ingress"], "egress is left open (the model may be fetched at start)"


def test_network_policy_names_ports_the_container_has(docs: list[Obj]) -> None:
    c = container(docs)
    opened = [p for rule in one(docs, "NetworkPolicy")["spec"]["ingress"] for p in rule.get("ports", [])]
    assert opened, "a rule without ports opens every port"
    for p in opened:
        assert isinstance(p["port"], str), f"{p}: name the port, so the policy follows the container's number"
        assert port(c, p["port"]) and p.get("protocol", "TCP") == "TCP" and "endPort" not in p, p
    assert sorted(p["port"] for p in opened) == sorted(p["name"] for p in c["ports"]), "one rule per served port"


def test_network_policy_admits_the_namespace_to_grpc_and_monitoring_to_metrics(docs: list[Obj]) -> None:
    policy = one(docs, "NetworkPolicy")
    c = container(docs)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    monitoring = monitoring_namespace()
    clients = {
        "a client pod of this namespace": (NAMESPACE, {"app": "client"}),
        "another attnserve pod": (NAMESPACE, pod_labels),
        "Prometheus": (monitoring, {"app.kubernetes.io/name": "prometheus"}),
        "another pod of the monitoring namespace": (monitoring, {"app": "grafana"}),
        "a pod of another namespace": ("default", {"app": "client"}),
        "a pod of another namespace with attnserve's labels": ("default", pod_labels),
        "a pod of a namespace called attnserve-monitoring": ("attnserve-monitoring", {}),
    }
    allowed = {
        (who, name) for who, (ns, labels) in clients.items() for name in ("grpc", "metrics")
        if ingress_allowed(policy, c, name, ns, labels)
    }  # fmt: skip
    assert allowed == {
        ("a client pod of this namespace", "grpc"),
        ("another attnserve pod", "grpc"),
        ("Prometheus", "metrics"),
        ("another pod of the monitoring namespace", "metrics"),
    }
    # What the ServiceMonitor scrapes (its port, through the Service, to the container) is what is opened.
    (endpoint,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    service_ports = one(docs, "Service", "attnserve")["spec"]["ports"]
    (target,) = [p["targetPort"] for p in service_ports if p["name"] == endpoint["port"]]
    assert ingress_allowed(policy, c, target, monitoring, {"app.kubernetes.io/name": "prometheus"})


def adapter_rule() -> Obj:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return dict(rule)


def test_autoscaler_scales_on_cpu_and_inflight_requests(overlay: str, docs: list[Obj]) -> None:
    deployment = one(docs, "Deployment")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "attnserve"}
    assert "replicas" not in deployment["spec"], "the HPA owns replicas; apply would reset them"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics.keys() == {"Resource", "Pods"}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    pods = metrics["Pods"]["pods"]
    rule = adapter_rule()
    assert pods["metric"]["name"] == rule["name"]["as"], "HPA metric vs the adapter's name for it"
    series = re.match(r"'?(\w+)\{", rule["seriesQuery"])
    assert series and series.group(1) in SERVICE_METRICS, rule["seriesQuery"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert pods["target"]["type"] == "AverageValue"
    per_pod = int(pods["target"]["averageValue"])
    assert per_pod >= settings_from(settings_env(docs)).engine_workers, "target below one request per worker"
    assert per_pod == {"cpu": 8, "gpu": 32}[overlay]


# --- monitoring (prometheus-operator kinds: checked by structure) ---------------------------------------


def rules_job() -> str:
    """The job the alerts expect (AttnserveInstanceDown: up{job="..."})."""
    match = re.search(r'up\{job="([^"]+)"\}', (PROMETHEUS / "rules.yml").read_text())
    assert match
    return match.group(1)


def test_service_monitor_scrapes_each_pod_once_as_the_rules_job(docs: list[Obj]) -> None:
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    (endpoint,) = spec["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint.get("scheme", "http") == "http"
    scrape_interval = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert endpoint["interval"] == scrape_interval, "rules and dashboards assume prometheus.yml's interval"
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [s for s in services if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])]
    scraped = [s for s in selected if any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in scraped] == ["attnserve"], "exactly one Service may expose metrics"
    assert scraped[0]["metadata"]["labels"][spec["jobLabel"]] == rules_job()


def load_generator() -> Any:
    path = Path(__file__).resolve().parents[2] / "scripts" / "gen_prometheusrule.py"
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheus_rule_is_rules_yml(docs: list[Obj]) -> None:
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    generator = load_generator()
    assert generator.OUT.read_text() == generator.render(generator.RULES.read_text()), (
        "prometheusrule.yaml is stale: make k8s-rules"
    )
