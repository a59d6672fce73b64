"""`helm test`'s optional burn-in pod (`tests.stress.enabled`): absent by default; when on, a valid
Pod that runs `ray-vram check --stress` with the chart's settings (arguments the real CLI parses),
joins Ray with the cluster's token, and is let through the Ray pods' NetworkPolicy."""

from __future__ import annotations

import kubernetes_validate
import pytest

from vram_scheduler.cli.main import build_parser

from .helm import CHART, find, render, render_fails

ON = ["tests.stress.enabled=true", "tests.stress.seconds=30", "tests.stress.nodes={gpu-1,gpu-2}"]
SECURITY = CHART / "ci" / "security-values.yaml"


def stress_pods(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"].endswith("-test-stress")]


def stress_test_selector(docs: list[dict]) -> bool:
    policy = find(docs, "NetworkPolicy", "-ray")
    sources = [s for rule in policy["spec"]["ingress"] for s in rule.get("from", [])]
    components = [s.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") for s in sources]
    return "stress-test" in components


def test_stress_pod_is_off_by_default() -> None:
    docs = render(values=[SECURITY])
    assert stress_pods(docs) == []
    assert not stress_test_selector(docs)


def test_stress_pod_when_enabled_runs_check_stress_with_the_chart_settings() -> None:
    docs = render(values=[SECURITY], sets=ON)
    (pod,) = stress_pods(docs)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["activeDeadlineSeconds"] == 2 * 30 + 600
    (container,) = pod["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["ray-vram", "check", "--stress"]
    args = build_parser().parse_args(command[1:])
    assert args.stress and args.seconds == 30 and args.gpu_fraction == 0.5 and args.slow_ratio == 0.7
    assert args.nodes == ["gpu-1", "gpu-2"] and args.ray_address == "rv-ray-vram-head-svc:6379"
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
    assert stress_test_selector(docs), "the Ray pods' NetworkPolicy lets the burn-in driver in"
    kubernetes_validate.validate(pod, "1.35.0", strict=True)


@pytest.mark.parametrize(
    ("sets", "path"),
    [(["tests.stress.gpuFraction=1.5"], "gpuFraction"), (["tests.stress.slowRatio=-1"], "slowRatio")],
)
def test_bad_stress_settings_are_refused(sets: list[str], path: str) -> None:
    assert path in render_fails(sets=sets)
