"""The chart's credentials: rendered manifests carry no random data (two `helm template` runs are
identical, so GitOps sees no change), the auth Secret is made by a hook Job with a narrow Role, every
Ray container gets the internal key (and a Hugging Face token) by secretKeyRef, the controller its
token, and the controller's NetworkPolicy lets in only the release and `controllerFrom`.
(The hook's command runs against a real API server in test_apiserver.py.)"""

from __future__ import annotations

from typing import Any

from .helm import CHART, find, render, run, template_args, tools

SECURITY = CHART / "ci" / "security-values.yaml"


def ray_containers(docs: list[dict]) -> list[tuple[str, dict]]:
    cluster = find(docs, "RayCluster")["spec"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]["containers"][0]) for name, group in groups]


def env_of(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", e.get("value")) for e in container.get("env", [])}


def test_two_renders_are_identical() -> None:
    for sets in ([], ["apiKey.value="], ["rayCluster.cpuGroups[0].name=cpu"]):
        first = run([tools().helm, *template_args(sets=sets)]).stdout
        second = run([tools().helm, *template_args(sets=sets)]).stdout
        assert first == second, f"two renders with {sets} differ"


def test_the_auth_secret_is_made_by_a_hook_job_never_rendered() -> None:
    docs = render()
    assert not [d for d in docs if d["kind"] == "Secret"], "no Secret (and no random value) in the manifests"
    job = find(docs, "Job", "-auth-secret")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["ray-vram", "ensure-secret", "--name=rv-ray-vram-auth"]
    assert {"--key=controller-token", "--key=internal-key", "--key=api-key"} <= set(command)
    assert "--copy=api-key=rv-ray-vram-api-key/api-key" in command, "an earlier release's generated key is kept"
    role = find(docs, "Role", "-auth-secret")
    named = next(r for r in role["rules"] if "resourceNames" in r)
    assert named["verbs"] == ["get", "patch"] and named["resourceNames"] == ["rv-ray-vram-auth", "rv-ray-vram-api-key"]
    assert all(r["resources"] == ["secrets"] for r in role["rules"]) and len(role["rules"]) == 2
    # A fixed API key stays a rendered Secret of its own (deterministic), and the Job then makes no api-key.
    fixed = render(sets=["apiKey.value=abc"])
    assert find(fixed, "Secret", "-api-key")["data"]["api-key"] == "YWJj"
    assert (
        "--key=api-key"
        not in find(fixed, "Job", "-auth-secret")["spec"]["template"]["spec"]["containers"][0]["command"]
    )


def test_every_ray_container_and_the_controller_get_their_keys_by_reference() -> None:
    docs = render(sets=["hfToken.existingSecret=hf", "rayCluster.cpuGroups[0].name=cpu"])
    for name, container in ray_containers(docs):
        env = env_of(container)
        assert env["RAY_VRAM_INTERNAL_KEY"] == {"name": "rv-ray-vram-auth", "key": "internal-key"}, name
        assert env["RAY_VRAM_API_KEY"] == {"name": "rv-ray-vram-auth", "key": "api-key"}, name
        assert env["HF_TOKEN"] == {"name": "hf", "key": "token"}, name
    controller = find(docs, "Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(controller)
    assert env["RAY_VRAM_CONTROLLER_TOKEN"] == {"name": "rv-ray-vram-auth", "key": "controller-token"}
    assert "kubectl -n ray-vram get secret rv-ray-vram-auth" in env["RAY_VRAM_CONTROLLER_TOKEN_HINT"]
    hosts = env["RAY_VRAM_CONTROLLER_HOSTS"].split(",")
    assert {"rv-ray-vram-controller", "rv-ray-vram-controller.ray-vram.svc.cluster.local"} <= set(hosts)
    test_pod = next(d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"].endswith("-test"))
    assert env_of(test_pod["spec"]["containers"][0])["CONTROLLER_TOKEN"]["key"] == "controller-token"


def test_existing_secrets_are_used_and_no_job_runs() -> None:
    docs = render(values=[SECURITY])
    assert not [d for d in docs if d["kind"] in {"Job", "Role"} and "auth-secret" in d["metadata"]["name"]]
    for name, container in ray_containers(docs):
        env = env_of(container)
        assert env["RAY_VRAM_INTERNAL_KEY"] == {"name": "llm-auth", "key": "internal-key"}, name
        assert env["HF_TOKEN"] == {"name": "hf", "key": "hf-token"}, name
        assert env["RAY_VRAM_API_KEY"] == {"name": "llm-api-key", "key": "api-key"}, name
    controller = find(docs, "Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(controller)["RAY_VRAM_CONTROLLER_TOKEN"] == {"name": "llm-auth", "key": "controller-token"}


def test_the_controller_network_policy_admits_only_controller_from() -> None:
    docs = render(values=[SECURITY])
    policy = find(docs, "NetworkPolicy", "-controller")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}}]
    closed = find(render(sets=["networkPolicy.enabled=true"]), "NetworkPolicy", "-controller")["spec"]
    assert closed["ingress"] == [], "without controllerFrom only the release's own pods (other policy) reach it"


def test_prometheus_scrapes_the_controller_with_its_token() -> None:
    """The controller's /metrics needs the token like every route but /healthz: the ServiceMonitor's
    controller endpoint reads it from the auth Secret (the operator's own with `auth.existingSecret`)."""
    for values, secret in (([], "rv-ray-vram-auth"), ([SECURITY], "llm-auth")):
        monitor = find(render(values=values, sets=["monitoring.prometheusOperator=always"]), "ServiceMonitor")
        by_port = {e["port"]: e for e in monitor["spec"]["endpoints"]}
        assert by_port["http"]["authorization"] == {
            "type": "Bearer",
            "credentials": {"name": secret, "key": "controller-token"},
        }
        assert "authorization" not in by_port["metrics"], "the monitor's exporter has no token to check"
