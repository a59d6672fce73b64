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
import sys
import time
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
        start = time.monotonic()
        result = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, input=stdin, cwd=ROOT)
        took = time.monotonic() - start
        shown = " ".join(Path(c).name if c.startswith("/") and "/bin/" in c else c for c in cmd)
        self.log.write(f"$ {shown}\n{result.stdout}{result.stderr}[exit {result.returncode}, {took:.1f} s]\n\n")
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
    start = time.monotonic()
    started = subprocess.run(["bash", script, "start"], capture_output=True, text=True)
    assert started.returncode == 0, f"ci/kube-apiserver.sh start failed:\n{started.stderr}"
    kubeconfig = started.stdout.strip().splitlines()[-1]
    TRANSCRIPT.parent.mkdir(parents=True, exist_ok=True)
    TRANSCRIPT.write_text(
        "# helm/kubectl against kube-apiserver 1.20.2 on 127.0.0.1 (ci/kube-apiserver.sh start: "
        f"{time.monotonic() - start:.1f} s)\n\n"
    )
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


#: What the release creates in its namespace, read back in one request per phase.
RELEASE_TYPES = ",".join(
    [
        "rayclusters.ray.io",
        "deployments.apps",
        "daemonsets.apps",
        "configmaps",
        "secrets",
        "services",
        "poddisruptionbudgets.v1beta1.policy",
    ]
)


def read_back(cluster: Cluster, namespace: str) -> dict[str, dict]:
    """{Kind/name: object} of everything the release may have created in the namespace."""
    items = json.loads(cluster.kubectl("-n", namespace, "get", RELEASE_TYPES, "-o", "json").stdout)["items"]
    objects = {f"{item['kind']}/{item['metadata']['name']}": item for item in items}
    # Helm's own release records are not the chart's objects.
    return {k: v for k, v in objects.items() if not k.startswith("Secret/sh.helm.release.")}


def test_install_upgrade_uninstall(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    ns, release = namespace, "rv"
    install = cluster.helm("install", release, str(CHART), "-n", ns, "--skip-crds", "-f", str(VALUES))
    assert "STATUS: deployed" in install.stdout
    assert f"helm test {release} -n {ns}" in install.stdout, "NOTES name the next steps"

    before = read_back(cluster, ns)
    spec = before["RayCluster/rv-ray-vram"]["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu", "gpu"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["command"] == ["ray-vram", "node-start"] and head["args"] == ["head"]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 10001, 8000, 8080}
    config = load(before["ConfigMap/rv-ray-vram-config"]["data"]["config.yaml"])
    assert [m["model_id"] for m in config["models"]] == ["tiny", "tiny-max"]
    controller = before["Deployment/rv-ray-vram-controller"]
    checksum = controller["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert before["DaemonSet/rv-ray-vram-monitor"]["spec"]["template"]["spec"]["hostPID"] is True
    for service in ("openai", "dashboard", "controller", "monitor"):
        assert f"Service/rv-ray-vram-{service}" in before, service
    api_key = decoded(before["Secret/rv-ray-vram-api-key"], "api-key")
    assert api_key == "test-api-key-not-secret"  # generated keys: test_auth_secret_hook_as_its_service_account
    # The 1.20 server has no policy/v1: the chart asked the server and used policy/v1beta1.
    assert before["PodDisruptionBudget/rv-ray-vram-gpu"]["apiVersion"] == "policy/v1beta1"
    # No Prometheus Operator API on this server: no monitoring objects; the dashboards are there.
    assert "ConfigMap/rv-ray-vram-models-dashboard" in before
    assert "servicemonitors" not in cluster.kubectl("api-resources", "-o", "name").stdout
    # The operator subchart came along.
    assert "Deployment/kuberay-operator" in before

    values = yaml.safe_load(VALUES.read_text())
    values["models"][0]["vram_gb"] = 2
    values["models"][0]["replicas"] = 1
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(values))
    upgrade = cluster.helm("upgrade", release, str(CHART), "-n", ns, "--skip-crds", "-f", str(changed))
    assert "STATUS: deployed" in upgrade.stdout and "REVISION: 2" in upgrade.stdout

    after = read_back(cluster, ns)
    config = load(after["ConfigMap/rv-ray-vram-config"]["data"]["config.yaml"])
    assert config["models"][0]["vram_gb"] == 2 and config["models"][0]["replicas"] == 1
    controller_after = after["Deployment/rv-ray-vram-controller"]
    assert controller_after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != checksum
    assert controller_after["metadata"]["generation"] == controller["metadata"]["generation"] + 1
    # GPU pods would not restart: the RayCluster and the DaemonSet were not changed at all.
    for name in ("RayCluster/rv-ray-vram", "DaemonSet/rv-ray-vram-monitor"):
        assert after[name]["metadata"]["generation"] == before[name]["metadata"]["generation"], name
        assert after[name]["spec"] == before[name]["spec"], name
        assert after[name]["metadata"].get("labels") == before[name]["metadata"].get("labels"), name
    changed_objects = sorted(
        k
        for k in before
        if k in after and before[k].get("spec", before[k].get("data")) != after[k].get("spec", after[k].get("data"))
    )
    assert changed_objects == ["ConfigMap/rv-ray-vram-config", "Deployment/rv-ray-vram-controller"], changed_objects
    assert decoded(after["Secret/rv-ray-vram-api-key"], "api-key") == api_key, "API key kept"
    history = cluster.helm("history", release, "-n", ns, "-o", "json")
    assert [r["status"] for r in json.loads(history.stdout)] == ["superseded", "deployed"]

    cluster.helm("uninstall", release, "-n", ns)
    left = {k for k in read_back(cluster, ns) if not k.startswith("Secret/default-token")}
    assert not left, f"left after uninstall: {sorted(left)}"
    assert cluster.helm("list", "-n", ns, "-q").stdout.strip() == ""


def test_auth_secret_hook_as_its_service_account(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    """The auth Secret's hook, its command run as its own service account (no kubelet here to run
    the Job): keys created once, an earlier release's API key taken over, nothing changed on the next
    run, a removed key made anew (rotation), nothing else readable; `helm uninstall` leaves the Secret."""
    ns = namespace
    sets = ["auth.secretJob.enabled=true", "apiKey.value="]
    docs = render(values=[VALUES], namespace=ns, sets=sets)
    hook = [d for d in docs if d["metadata"]["name"].endswith("-auth-secret")]
    job = next(d for d in hook if d["kind"] == "Job")
    cluster.kubectl("-n", ns, "create", "-f", "-", stdin=dump_all(d for d in hook if d["kind"] != "Job"))
    account = job["spec"]["template"]["spec"]["serviceAccountName"]
    token = tmp_path / "token"
    token.write_text(cluster.kubectl("-n", ns, "create", "token", account).stdout.strip())
    kubeconfig = Path(cluster.env["KUBECONFIG"])
    server = load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "ray-vram"

    def run_hook() -> dict:
        where = ["--namespace", ns, "--api-server", server, "--token-file", str(token)]
        ca = ["--ca-file", str(kubeconfig.parent / "certs" / "apiserver.crt")]
        return json.loads(cluster.run(sys.executable, "-m", "vram_scheduler.cli", *command[1:], *where, *ca).stdout)

    def values() -> dict[str, str]:
        secret = cluster.get(ns, "secret", "rv-ray-vram-auth")
        return {key: decoded(secret, key) for key in secret["data"]}

    earlier = "key-of-an-earlier-release"
    cluster.kubectl("-n", ns, "create", "secret", "generic", "rv-ray-vram-api-key", f"--from-literal=api-key={earlier}")
    first = run_hook()
    assert (first["created"], first["copied"]) == (["controller-token", "internal-key"], ["api-key"]), first
    made = values()
    assert made["api-key"] == earlier and all(len(made[k]) == 64 for k in ("controller-token", "internal-key"))
    assert run_hook()["kept"] == ["controller-token", "internal-key", "api-key"] and values() == made
    remove = '[{"op": "remove", "path": "/data/internal-key"}]'
    cluster.kubectl("-n", ns, "patch", "secret", "rv-ray-vram-auth", "--type=json", "-p", remove)
    assert run_hook()["created"] == ["internal-key"]
    rotated = values()
    assert rotated["internal-key"] != made["internal-key"] and rotated["controller-token"] == made["controller-token"]
    who = f"--as=system:serviceaccount:{ns}:{account}"
    cluster.kubectl("-n", ns, "create", "secret", "generic", "unrelated", "--from-literal=x=y")
    assert (
        cluster.kubectl("-n", ns, "auth", "can-i", "get", "secret/unrelated", who, check=False).stdout.strip() == "no"
    )
    assert cluster.kubectl("-n", ns, "auth", "can-i", "list", "secrets", who, check=False).stdout.strip() == "no"

    # The release uses the Secret by reference and does not own it: uninstall leaves it.
    cluster.helm("install", "rv", str(CHART), "-n", ns, "--skip-crds", "--no-hooks", "-f", str(VALUES), *_sets(sets))
    controller = cluster.get(ns, "deployment", "rv-ray-vram-controller")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in controller["env"]}
    assert env["RAY_VRAM_CONTROLLER_TOKEN"] == {"name": "rv-ray-vram-auth", "key": "controller-token"}
    cluster.helm("uninstall", "rv", "-n", ns)
    assert values() == rotated


def _sets(sets: list[str]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


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
        assert "RayVRAMReplicaOverReservation" in alerts
        cluster.helm("uninstall", "mon", "-n", namespace)
    finally:
        cluster.kubectl("delete", "crd", "--ignore-not-found", *(c["metadata"]["name"] for c in crds))
