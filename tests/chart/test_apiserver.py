"""`helm install`, `helm upgrade` and `helm uninstall` against a real kube-apiserver (1.20, built by
ci/kube-apiserver.sh) with KubeRay's CRDs installed: objects are read back, a model change reaches
the ConfigMap and the controller only, a bad RayCluster field is refused, and the chart follows the
server's API list (policy/v1beta1 there; Prometheus Operator objects only once its CRDs exist).

No kubelet runs there: objects are stored and validated, nothing is scheduled. Every command and its
output goes to .work/chart-apiserver-transcript.txt."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .helm import CHART, ROOT, dump_all, for_k8s120, helm_env, kuberay_crds, load, monitoring_crds, render, tools

pytestmark = pytest.mark.slow
VALUES = CHART / "ci" / "apiserver-values.yaml"
TRANSCRIPT = ROOT / ".work" / "chart-apiserver-transcript.txt"


class Cluster:
    """kubectl and helm pointed at the test API server; every call is written to the transcript."""

    def __init__(self, kubeconfig: str, work: Path):
        self.env = {**helm_env(work / "helm-home"), "KUBECONFIG": kubeconfig}
        self.work = work
        TRANSCRIPT.parent.mkdir(parents=True, exist_ok=True)
        self.log = TRANSCRIPT.open("a")

    def run(self, *cmd: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, input=stdin, cwd=ROOT)
        shown = " ".join(Path(c).name if c.startswith("/") and "/bin/" in c else c for c in cmd)
        self.log.write(f"$ {shown}\n{result.stdout}{result.stderr}[exit {result.returncode}]\n\n")
        self.log.flush()
        if check and result.returncode != 0:
            raise AssertionError(f"{shown} exited {result.returncode}:\n{result.stderr}{result.stdout[-3000:]}")
        return result

    def kubectl(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(tools().kubectl, *args, **kwargs)

    def helm(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(tools().helm, *args, **kwargs)

    def get(self, namespace: str, kind: str, name: str) -> dict:
        return json.loads(self.kubectl("-n", namespace, "get", kind, name, "-o", "json").stdout)

    def exists(self, namespace: str, kind: str, name: str) -> bool:
        result = self.kubectl("-n", namespace, "get", kind, name, "--ignore-not-found", "-o", "name", check=False)
        return bool(result.stdout.strip())

    def create_crds(self, crds: list[dict]) -> None:
        """`kubectl create` (not apply: the last-applied annotation would exceed its size limit)."""
        missing = [c for c in crds if not self.exists("default", "crd", c["metadata"]["name"])]
        if missing:
            self.kubectl("create", "--validate=false", "-f", "-", stdin=dump_all(for_k8s120(c) for c in missing))
            for crd in missing:
                self.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    script = str(ROOT / "ci" / "kube-apiserver.sh")
    already = subprocess.run(["bash", script, "status"], capture_output=True, text=True)
    started = subprocess.run(["bash", script, "start"], capture_output=True, text=True)
    assert started.returncode == 0, f"ci/kube-apiserver.sh start failed:\n{started.stderr}"
    kubeconfig = started.stdout.strip().splitlines()[-1]
    TRANSCRIPT.parent.mkdir(parents=True, exist_ok=True)
    TRANSCRIPT.write_text("# helm/kubectl against kube-apiserver 1.20.2 on 127.0.0.1 (ci/kube-apiserver.sh)\n\n")
    cluster = Cluster(kubeconfig, tmp_path_factory.mktemp("apiserver"))
    cluster.kubectl("version")
    # The server is the tests' own: releases left by an interrupted run go first (no garbage
    # collector runs there, so a deleted namespace would keep its objects and its cluster roles).
    for leftover in json.loads(cluster.helm("list", "-A", "-o", "json").stdout or "[]"):
        cluster.helm("uninstall", leftover["name"], "-n", leftover["namespace"], check=False)
    cluster.create_crds(list(kuberay_crds().values()))
    cluster.kubectl("delete", "crd", "--ignore-not-found", *(c["metadata"]["name"] for c in monitoring_crds().values()))
    try:
        yield cluster
    finally:
        cluster.log.close()
        if already.returncode != 0 and not os.environ.get("RAY_VRAM_KEEP_APISERVER"):
            subprocess.run(["bash", script, "stop"], capture_output=True)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"rv-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    for release in cluster.helm("list", "-n", name, "-q").stdout.split():
        cluster.helm("uninstall", release, "-n", name, check=False)
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def decoded(secret: dict, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def test_install_upgrade_uninstall(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    ns, release = namespace, "rv"
    # A generated API key this time (the values file fixes one for the render tests).
    install = cluster.helm(
        "install", release, str(CHART), "-n", ns, "--skip-crds", "-f", str(VALUES), "--set", "apiKey.value="
    )
    assert "STATUS: deployed" in install.stdout
    assert f"helm test {release} -n {ns}" in install.stdout, "NOTES name the next steps"

    cluster_obj = cluster.get(ns, "raycluster", "rv-ray-vram")
    spec = cluster_obj["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu", "gpu"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["command"] == ["ray-vram", "node-start"] and head["args"] == ["head"]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 10001, 8000, 8080}
    config = load(cluster.get(ns, "configmap", "rv-ray-vram-config")["data"]["config.yaml"])
    assert [m["model_id"] for m in config["models"]] == ["tiny", "tiny-max"]
    controller = cluster.get(ns, "deployment", "rv-ray-vram-controller")
    checksum = controller["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    monitor = cluster.get(ns, "daemonset", "rv-ray-vram-monitor")
    assert monitor["spec"]["template"]["spec"]["hostPID"] is True
    for service in ("openai", "dashboard", "controller", "monitor"):
        assert cluster.exists(ns, "service", f"rv-ray-vram-{service}"), service
    api_key = decoded(cluster.get(ns, "secret", "rv-ray-vram-api-key"), "api-key")
    assert len(api_key) == 40
    # The 1.20 server has no policy/v1: the chart asked the server and used policy/v1beta1.
    pdb = cluster.get(ns, "poddisruptionbudgets.v1beta1.policy", "rv-ray-vram-gpu")
    assert pdb["apiVersion"] == "policy/v1beta1"
    # No Prometheus Operator API on this server: no monitoring objects, dashboards still there.
    assert not cluster.exists(ns, "crd", "servicemonitors.monitoring.coreos.com")
    assert cluster.exists(ns, "configmap", "rv-ray-vram-models-dashboard")
    # The operator subchart came along.
    assert cluster.exists(ns, "deployment", "kuberay-operator")

    values = yaml.safe_load(VALUES.read_text())
    values["models"][0]["vram_gb"] = 2
    values["models"][0]["replicas"] = 1
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(values))
    upgrade = cluster.helm(
        "upgrade", release, str(CHART), "-n", ns, "--skip-crds", "-f", str(changed), "--set", "apiKey.value="
    )
    assert "STATUS: deployed" in upgrade.stdout and "REVISION: 2" in upgrade.stdout

    config = load(cluster.get(ns, "configmap", "rv-ray-vram-config")["data"]["config.yaml"])
    assert config["models"][0]["vram_gb"] == 2 and config["models"][0]["replicas"] == 1
    controller_after = cluster.get(ns, "deployment", "rv-ray-vram-controller")
    assert controller_after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != checksum
    assert controller_after["metadata"]["generation"] == controller["metadata"]["generation"] + 1
    # GPU pods would not restart: the RayCluster and the DaemonSet were not changed at all.
    for kind, name, before in (
        ("raycluster", "rv-ray-vram", cluster_obj),
        ("daemonset", "rv-ray-vram-monitor", monitor),
    ):
        after = cluster.get(ns, kind, name)
        assert after["metadata"]["generation"] == before["metadata"]["generation"], kind
        assert after["spec"] == before["spec"], kind
        assert after["metadata"].get("labels") == before["metadata"].get("labels"), kind
    assert decoded(cluster.get(ns, "secret", "rv-ray-vram-api-key"), "api-key") == api_key, "API key kept"
    history = cluster.helm("history", release, "-n", ns, "-o", "json")
    assert [r["status"] for r in json.loads(history.stdout)] == ["superseded", "deployed"]

    cluster.helm("uninstall", release, "-n", ns)
    for kind, name in (
        ("raycluster", "rv-ray-vram"),
        ("deployment", "rv-ray-vram-controller"),
        ("daemonset", "rv-ray-vram-monitor"),
        ("configmap", "rv-ray-vram-config"),
        ("secret", "rv-ray-vram-api-key"),
        ("service", "rv-ray-vram-openai"),
    ):
        assert not cluster.exists(ns, kind, name), f"{kind}/{name} left after uninstall"
    assert cluster.helm("list", "-n", ns, "-q").stdout.strip() == ""


def test_bad_raycluster_fields_are_refused(cluster: Cluster, namespace: str) -> None:
    """The server enforces the CRD's enums; kubectl refuses fields the CRD does not know."""
    cluster_doc = next(d for d in render(values=[VALUES], namespace=namespace) if d["kind"] == "RayCluster")
    bad_value = json.loads(json.dumps(cluster_doc))
    bad_value["spec"]["authOptions"]["mode"] = "sometimes"
    result = cluster.kubectl(
        "-n", namespace, "create", "--validate=false", "-f", "-", stdin=json.dumps(bad_value), check=False
    )
    assert result.returncode != 0
    assert "spec.authOptions.mode" in result.stderr and "sometimes" in result.stderr, result.stderr
    unknown = json.loads(json.dumps(cluster_doc))
    unknown["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "1"}
    result = cluster.kubectl("-n", namespace, "create", "-f", "-", stdin=json.dumps(unknown), check=False)
    assert result.returncode != 0
    assert "rayStartParam" in result.stderr, result.stderr
    # The rendered one is accepted as it is.
    cluster.kubectl("-n", namespace, "create", "-f", "-", stdin=json.dumps(cluster_doc))
    assert cluster.exists(namespace, "raycluster", cluster_doc["metadata"]["name"])


def test_monitoring_objects_appear_with_the_prometheus_operator_api(cluster: Cluster, namespace: str) -> None:
    """monitoring.prometheusOperator=auto: nothing without the API (checked above), the ServiceMonitor,
    PodMonitor and PrometheusRule once the Prometheus Operator's CRDs are installed."""
    crds = list(monitoring_crds().values())
    cluster.create_crds(crds)
    try:
        # The KubeRay operator's cluster-wide objects belong to the first release; this one goes without.
        args = ["-n", namespace, "--skip-crds", "-f", str(VALUES), "--set", "kuberay-operator.enabled=false"]
        cluster.helm("install", "mon", str(CHART), *args)
        for kind in ("servicemonitor", "podmonitor", "prometheusrule"):
            name = "mon-ray-vram-ray" if kind == "podmonitor" else "mon-ray-vram"
            assert cluster.exists(namespace, kind, name), f"{kind} missing although the API exists"
        rule = cluster.get(namespace, "prometheusrule", "mon-ray-vram")
        alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
        assert "RayVRAMReplicaOverBudget" in alerts
        cluster.helm("uninstall", "mon", "-n", namespace)
    finally:
        cluster.kubectl("delete", "crd", "--ignore-not-found", *(c["metadata"]["name"] for c in crds))
