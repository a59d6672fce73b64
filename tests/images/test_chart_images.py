"""The chart's default image references are the images images/*/Dockerfile build, at the chart's
appVersion, and the versions the Dockerfiles pin agree with the chart and the package."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/ray-vram"


def dockerfile_arg(image: str, name: str) -> str:
    text = (ROOT / "images" / image / "Dockerfile").read_text()
    match = re.search(rf"^ARG {name}=(\S+)$", text, re.MULTILINE)
    assert match, f"images/{image}/Dockerfile has no default for ARG {name}"
    return match.group(1)


@pytest.fixture(scope="module")
def rendered_images() -> set[str]:
    """Every container image of the chart rendered with its default values (real Helm)."""
    bin_dir = subprocess.run(
        ["bash", str(ROOT / "ci/install-helm.sh")], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    manifest = subprocess.run(
        [f"{bin_dir}/helm", "template", "rv", str(CHART)], capture_output=True, text=True, check=True
    ).stdout
    images: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and isinstance(value, str):
                    images.add(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for document in yaml.safe_load_all(manifest):
        walk(document)
    return images


def test_chart_app_version_is_the_package_version_and_the_image_version() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert app_version == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert dockerfile_arg("ray-vram", "VERSION") == app_version
    assert dockerfile_arg("monitor", "VERSION") == app_version


def test_chart_default_images_are_the_ones_the_dockerfiles_build(rendered_images) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    ours = {image for image in rendered_images if image.split(":")[0].startswith("ray-vram/")}
    assert ours == {f"ray-vram/ray-vram:{app_version}", f"ray-vram/monitor:{app_version}"}
    for image in ours:
        name = image.split(":")[0].removeprefix("ray-vram/")
        assert (ROOT / "images" / name / "Dockerfile").is_file()
    # ci/build-images.sh tags what Kubernetes resolves these short names to.
    script = (ROOT / "ci/build-images.sh").read_text()
    assert "docker.io/$image" in script and "localhost/$image" in script


def test_pinned_versions_agree_between_dockerfile_chart_and_package() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    ray_version = dockerfile_arg("ray-vram", "RAY_VERSION")
    assert values["rayCluster"]["rayVersion"] == ray_version
    assert dockerfile_arg("ray-vram", "BASE_IMAGE") == f"docker.io/rayproject/ray:{ray_version}-py311-gpu"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"ray[serve]=={ray_version}" in extras["serve"]
    assert f"ray=={ray_version}" in (ROOT / "images/monitor/requirements.txt").read_text().split()
    assert values["vllm"]["initContainer"]["package"] == f"vllm=={dockerfile_arg('ray-vram', 'VLLM_VERSION')}"
