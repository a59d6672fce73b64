"""Changing a model changes only the models ConfigMap and the controller's checksum (no GPU pod
restarts); APIs newer than the oldest supported server are used only where the server has them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .helm import CHART, ROOT, load, run, template_args, tools

BASE = CHART / "ci" / "apiserver-values.yaml"


def render_texts(values: list[Path], **kwargs) -> dict[str, str]:
    """helm template → {Kind/name: the object's exact rendered text}."""
    out = run([tools().helm, *template_args(values=values, **kwargs)]).stdout
    texts = {}
    for chunk in out.split("\n---\n"):
        doc = load(chunk)
        if doc:
            texts[f"{doc['kind']}/{doc['metadata']['name']}"] = chunk
    return texts


def changed_model(tmp_path: Path, change: dict) -> Path:
    values = yaml.safe_load(BASE.read_text())
    values["models"][0].update(change)
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    "change",
    [{"vram_gb": 2}, {"replicas": 3}, {"model": "/models/other"}, {"engine_kwargs": {"enforce_eager": True}}],
    ids=["vram", "replicas", "source", "engine-kwargs"],
)
def test_model_change_touches_only_config_and_controller_checksum(tmp_path: Path, change: dict) -> None:
    before = render_texts([BASE])
    after = render_texts([changed_model(tmp_path, change)])
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == ["ConfigMap/rv-ray-vram-config", "Deployment/rv-ray-vram-controller"], changed
    old, new = load(before[changed[1]]), load(after[changed[1]])
    old_sum = old["spec"]["template"]["metadata"]["annotations"].pop("checksum/config")
    new_sum = new["spec"]["template"]["metadata"]["annotations"].pop("checksum/config")
    assert old_sum != new_sum
    assert old == new, "the controller changed beyond its config checksum"
    for unchanged in ("RayCluster/rv-ray-vram", "DaemonSet/rv-ray-vram-monitor"):
        assert before[unchanged] == after[unchanged], f"{unchanged} must be byte-identical"


def test_config_map_holds_exactly_the_serving_config() -> None:
    from vram_scheduler.core.config import load_config, parse_config

    texts = render_texts([BASE])
    data = load(texts["ConfigMap/rv-ray-vram-config"])["data"]
    config = parse_config(yaml.safe_load(data["config.yaml"]))
    assert config == load_config(BASE)
    assert yaml.safe_load(data["config.json"]) == yaml.safe_load(data["config.yaml"])


MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def kinds(**kwargs) -> set[str]:
    return {load(t)["kind"] for t in render_texts([], **kwargs).values()}


@pytest.mark.parametrize(
    ("mode", "api_present", "expected"),
    [("auto", False, False), ("auto", True, True), ("always", False, True), ("never", True, False)],
)
def test_prometheus_operator_objects_follow_the_api(mode: str, api_present: bool, expected: bool) -> None:
    apis = ["monitoring.coreos.com/v1"] if api_present else []
    found = kinds(sets=[f"monitoring.prometheusOperator={mode}"], api_versions=apis) & MONITORING_KINDS
    assert found == (MONITORING_KINDS if expected else set()), found


@pytest.mark.parametrize(("kube_version", "has_ttl"), [("1.20.2", False), ("1.23.0", True), ("1.35.0", True)])
def test_job_ttl_only_where_the_server_has_it(kube_version: str, has_ttl: bool) -> None:
    texts = render_texts([], kube_version=kube_version)
    job = load(texts["Job/rv-ray-vram-crd-upgrade"])
    assert ("ttlSecondsAfterFinished" in job["spec"]) == has_ttl


def test_pod_disruption_budget_uses_policy_v1_where_served() -> None:
    """Helm's built-in API list has policy/v1; the 1.20 server (no policy/v1) gets policy/v1beta1,
    checked against the real API server in test_apiserver.py."""
    texts = render_texts([])
    assert load(texts["PodDisruptionBudget/rv-ray-vram-gpu"])["apiVersion"] == "policy/v1"


def test_crd_upgrade_hook_carries_the_dependency_crds() -> None:
    import base64
    import gzip

    from .helm import kuberay_crds

    texts = render_texts([])
    config_map = load(texts["ConfigMap/rv-ray-vram-crd-upgrade"])
    assert config_map["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    unpacked = {
        name.removesuffix(".gz"): load(gzip.decompress(base64.b64decode(data)))
        for name, data in config_map["binaryData"].items()
    }
    assert unpacked == kuberay_crds(), "crds-upgrade/ differs from the vendored kuberay-operator chart's crds/"
    role = load(texts["ClusterRole/rv-ray-vram-crd-upgrade-ray-vram"])
    named = {n for rule in role["rules"] for n in rule.get("resourceNames", [])}
    assert named == {crd["metadata"]["name"] for crd in kuberay_crds().values()}
    job = load(texts["Job/rv-ray-vram-crd-upgrade"])
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--server-side" in command and "--force-conflicts" in command


def test_gpu_modes() -> None:
    def gpu_pod(sets: list[str]) -> dict:
        cluster = load(render_texts([], sets=sets)["RayCluster/rv-ray-vram"])
        return cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]

    runtime = gpu_pod([])
    container = runtime["containers"][0]
    assert runtime["runtimeClassName"] == "nvidia"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not container["securityContext"].get("privileged")
    host = gpu_pod(["gpu.mode=hostMounts", "rayCluster.gpuGroups[0].name=gpu", "rayCluster.gpuGroups[0].gpusPerNode=2"])
    container = host["containers"][0]
    assert "runtimeClassName" not in host
    assert container["securityContext"] == {"privileged": True}
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"} <= mounts
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LD_LIBRARY_PATH"] and env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert {"CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE"} <= env.keys()


def test_default_images_are_the_ones_images_builds() -> None:
    """The chart's default image references are what ci/build-images.sh and images/*/Dockerfile tag."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = next(
        line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("version")
    )
    assert chart["appVersion"] == version
    texts = render_texts([])
    cluster = load(texts["RayCluster/rv-ray-vram"])
    monitor = load(texts["DaemonSet/rv-ray-vram-monitor"])
    ray_image = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    monitor_image = monitor["spec"]["template"]["spec"]["containers"][0]["image"]
    assert ray_image == f"ray-vram/ray-vram:{version}"
    assert monitor_image == f"ray-vram/monitor:{version}"
    for image, dockerfile in ((ray_image, "ray-vram"), (monitor_image, "monitor")):
        text = (ROOT / "images" / dockerfile / "Dockerfile").read_text()
        assert f"-t {image} " in text or f"-t {image}\n" in text, f"images/{dockerfile}/Dockerfile does not tag {image}"
    build = (ROOT / "ci" / "build-images.sh").read_text()
    assert "ray-vram/monitor:" in build and "ray-vram/ray-vram:" in build


def test_metallb_load_balancer_with_a_fixed_ip() -> None:
    texts = render_texts([ROOT / "values" / "k3s-3cpu-3gpu-metallb.yaml"])
    service = load(texts["Service/rv-ray-vram-openai"])
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["loadBalancerIP"] == "192.168.1.240"
    annotations = service["metadata"]["annotations"]
    assert annotations["metallb.universe.tf/loadBalancerIPs"] == "192.168.1.240"
    assert annotations["metallb.universe.tf/address-pool"] == "default"
    assert all(p["protocol"] == "TCP" for p in service["spec"]["ports"]), "Helm 4's server-side apply needs protocol"
    default = load(render_texts([])["Service/rv-ray-vram-openai"])
    assert default["spec"]["type"] == "ClusterIP" and "annotations" not in default["metadata"]


def test_the_openai_service_reaches_the_router_hosts_and_only_ready_routers(tmp_path: Path) -> None:
    """The head and CPU groups with `routers` (default true) are router hosts: a Ray node label the
    controller places routers by, a pod label the `openai` Service selects, and (CPU pods) a
    readiness probe on the router's port, so a pod without a live router gets no requests."""
    values = yaml.safe_load((ROOT / "values" / "k3s-3cpu-3gpu-metallb.yaml").read_text())
    values["rayCluster"]["cpuGroups"].append({"name": "batch", "routers": False})
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    texts = render_texts([tmp_path / "values.yaml"])
    service = load(texts["Service/rv-ray-vram-openai"])
    assert service["spec"]["selector"] == {"ray.io/cluster": "rv-ray-vram", "ray-vram.io/router-host": "true"}
    assert service["spec"]["ports"][0]["targetPort"] == "serve"
    cluster = load(texts["RayCluster/rv-ray-vram"])["spec"]
    head = cluster["headGroupSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    hosts = {"head": head, "cpu": groups["cpu"]}
    for name, group in hosts.items():
        assert group["labels"] == {"ray-vram.io/router-host": "true"}, name
        assert group["template"]["metadata"]["labels"]["ray-vram.io/router-host"] == "true", name
        container = group["template"]["spec"]["containers"][0]
        assert {"name": "serve", "containerPort": 8000, "protocol": "TCP"} in container["ports"], name
    assert "readinessProbe" not in head["template"]["spec"]["containers"][0], "the head keeps KubeRay's probe"
    probe = groups["cpu"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"][-1]
    assert "http://localhost:8000/-/healthz" in probe and "local_raylet_healthz" in probe
    for name in ("batch", "gpu"):
        group = groups[name]
        assert "labels" not in group and "ray-vram.io/router-host" not in group["template"]["metadata"]["labels"]
        assert "readinessProbe" not in group["template"]["spec"]["containers"][0]


def test_security_scenario() -> None:
    texts = render_texts([CHART / "ci" / "security-values.yaml"])
    policies = {k: load(v) for k, v in texts.items() if k.startswith("NetworkPolicy/")}
    assert set(policies) == {f"NetworkPolicy/rv-ray-vram-{n}" for n in ("ray", "observability", "controller")}
    ray = policies["NetworkPolicy/rv-ray-vram-ray"]["spec"]
    dashboard_rule = next(r for r in ray["ingress"] if {"port": 8265, "protocol": "TCP"} in r.get("ports", []))
    assert dashboard_rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert "Secret/rv-ray-vram-api-key" not in texts, "an existing Secret is used, none created"
    cluster = load(texts["RayCluster/rv-ray-vram"])
    assert cluster["metadata"]["annotations"]["ray.io/ft-enabled"] == "true"
    assert cluster["spec"]["gcsFaultToleranceOptions"]["redisAddress"] == "redis-master.redis:6379"
    env = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    key_ref = next(e for e in env if e["name"] == "RAY_VRAM_API_KEY")["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": "llm-api-key", "key": "api-key"}


def test_token_auth_reaches_every_ray_client() -> None:
    """The controller and the monitors talk to the token-protected cluster with KubeRay's token."""
    texts = render_texts([])
    controller = load(texts["Deployment/rv-ray-vram-controller"])["spec"]["template"]["spec"]["containers"][0]
    monitor = load(texts["DaemonSet/rv-ray-vram-monitor"])["spec"]["template"]["spec"]["containers"][0]
    for container in (controller, monitor):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "rv-ray-vram", "key": "auth_token"}
    assert "--ray-address" in monitor["command"]
    off = load(render_texts([], sets=["rayCluster.tokenAuth=false"])["RayCluster/rv-ray-vram"])
    assert "authOptions" not in off["spec"]
