"""The container images, built by ci/build-images.sh with podman and run for real.

The serving image is the CI variant (VLLM=none, on the local Debian base); everything asserted
here is independent of vLLM. Containers run with --network=none or share one container's network
namespace, so nothing listens beyond the containers.
"""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SERVING = f"localhost/ray-vram/ray-vram:{VERSION}"
MONITOR = f"localhost/ray-vram/monitor:{VERSION}"
VALUES = f"{ROOT / 'values'}:/values:ro"

pytestmark = pytest.mark.slow


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", str(ROOT / "ci/podman.sh"), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def built_images() -> dict:
    """Both images (cached layers make a rebuild of unchanged sources take seconds)."""
    result = subprocess.run(
        ["bash", str(ROOT / "ci/build-images.sh")], capture_output=True, text=True, timeout=1200, check=False
    )
    print(result.stdout)
    assert result.returncode == 0, f"ci/build-images.sh failed:\n{result.stderr[-4000:]}"
    return json.loads((ROOT / ".work/images/build.json").read_text())


@pytest.fixture
def container_name() -> Iterator[Callable[[], str]]:
    """A unique name for a detached container, removed (with everything it started) afterwards."""
    names: list[str] = []

    def make() -> str:
        names.append(f"ray-vram-test-{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield make
    for name in reversed(names):
        podman("rm", "-f", "-t", "2", name, check=False)


def wait_for(name: str, code: str, timeout: float = 90) -> str:
    """Run python `code` in container `name` until it exits 0; its stdout. Fails with the container's log."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = podman("exec", name, "python3", "-c", code, check=False, timeout=60)
        if last.returncode == 0:
            return last.stdout
        time.sleep(1)
    logs = podman("logs", name, check=False)
    raise AssertionError(f"not ready after {timeout}s: {last.stderr[-2000:]}\ncontainer log:\n{logs.stderr[-3000:]}")


HTTP_GET = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}{path}', timeout=3).read().decode())"


def test_build_records_sizes_and_the_monitor_image_stays_under_300_mb(built_images) -> None:
    sizes = {row["image"]: row["size_bytes"] for row in built_images["images"]}
    assert built_images["vllm"] == "none"
    assert {f"ray-vram/monitor:{VERSION}", f"ray-vram/ray-vram:{VERSION}"} <= set(sizes)
    assert sizes[f"ray-vram/monitor:{VERSION}"] < 300 * 10**6, sizes


@pytest.mark.parametrize("image", [SERVING, MONITOR])
def test_images_carry_oci_labels_and_run_as_non_root(built_images, image) -> None:
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["User"] == "1000:100"
    assert podman("run", "--rm", "--network=none", "--entrypoint", "id", image, "-u").stdout.strip() == "1000"


def test_monitor_without_a_gpu_exits_with_the_no_nvml_message(built_images) -> None:
    result = podman("run", "--rm", "--network=none", MONITOR, check=False)
    assert result.returncode == 1
    assert "cannot initialise NVML" in result.stderr and "libnvidia-ml.so.1" in result.stderr


def test_monitor_serves_a_declared_inventory(built_images, container_name) -> None:
    name = container_name()
    podman("run", "-d", "--name", name, "--network=none", "-v", VALUES, MONITOR, "--inventory-file",
           "/values/inventory-example.yaml", "--node", "gpu-1", "--host", "127.0.0.1", "--port", "9400")  # fmt: skip
    wait_for(name, HTTP_GET.format(port=9400, path="/healthz"), timeout=60)
    metrics = wait_for(name, HTTP_GET.format(port=9400, path="/metrics"))
    totals = [line for line in metrics.splitlines() if line.startswith("ray_vram_gpu_total_bytes{")]
    assert len(totals) == 2 and all('node="gpu-1"' in line for line in totals)


def test_serving_image_runs_version_and_plans_like_the_package(built_images, tmp_path) -> None:
    assert podman("run", "--rm", "--network=none", SERVING, "--version").stdout.strip() == f"ray-vram {VERSION}"
    # The overhead stated (placement.replica_overhead_gb): the demo model's weights, from which it is
    # otherwise derived, are on the host but not in the image.
    values = yaml.safe_load((ROOT / "values" / "local.yaml").read_text()) | {"placement": {"replica_overhead_gb": 2}}
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(values))
    tmp_path.chmod(0o755)  # the image's user reads it through the mount (pytest's folders are 0700)
    (tmp_path / "local.yaml").chmod(0o644)
    plan = ["plan", "--inventory", "values/inventory-example.yaml", "--output", "json", "--values"]
    mounts = ["-v", VALUES, "-v", f"{tmp_path}:/stated:ro"]
    run = ["run", "--rm", "--network=none", *mounts, "-w", "/", SERVING]
    in_image = podman(*run, *plan, "/stated/local.yaml", check=False)
    on_host = subprocess.run(
        ["ray-vram", *plan, str(tmp_path / "local.yaml")], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert in_image.returncode == on_host.returncode in (0, 3), in_image.stderr
    assert json.loads(in_image.stdout) == json.loads(on_host.stdout)


def test_serving_image_entrypoint_runs_other_programs_and_kuberays_login_shell(built_images) -> None:
    assert podman("run", "--rm", "--network=none", SERVING, "python3", "-c", "print(6 * 7)").stdout.strip() == "42"
    # KubeRay (without the overwrite annotation) runs `bash -lc 'ulimit -n 65536; ray start ...'` and
    # probes with wget: both must be found from a login shell.
    found = podman("run", "--rm", "--network=none", SERVING, "bash", "-lc", "command -v ray ray-vram wget")
    assert len(found.stdout.split()) == 3


@pytest.fixture(scope="module")
def ray_head(built_images) -> Iterator[str]:
    """A Ray head started by `node-start` in the serving image, GPUs of node gpu-1 declared; its name."""
    name = f"ray-vram-test-head-{uuid.uuid4().hex[:8]}"
    try:
        podman("run", "-d", "--name", name, "--network=none", "--shm-size=256m", "-v", VALUES,
               "-e", "RAY_AUTH_MODE=disabled", SERVING, "node-start", "--inventory-file",
               "/values/inventory-example.yaml", "--node-name", "gpu-1", "head", "--num-cpus=1",
               "--include-dashboard=false", "--object-store-memory=80000000", "--ray-client-server-port=10001",
               "--disable-usage-stats")  # fmt: skip
        yield name
    finally:
        podman("rm", "-f", "-t", "2", name, check=False)


def test_node_start_in_the_image_starts_ray_with_gpus_and_labels(ray_head) -> None:
    out = wait_for(
        ray_head,
        "import json, ray; ray.init(address='auto', logging_level='ERROR'); "
        "print(json.dumps({'resources': ray.cluster_resources(), 'labels': ray.nodes()[0]['Labels']}))",
    )
    seen = json.loads(out.strip().splitlines()[-1])
    resources, labels = seen["resources"], seen["labels"]
    assert resources["GPU"] == 2
    assert not [name for name in resources if name.startswith("gpu_") or name.startswith("vram_")]
    assert labels["ray-vram.io/gpu-model"] == "mixed" and labels["ray-vram.io/node-name"] == "gpu-1"
    assert labels["ray-vram.io/gpu-count"] == "2"


def test_monitor_image_publishes_to_the_allocator_through_ray_client(ray_head, container_name) -> None:
    """The monitor image holds Ray only as a client: it must still reach the allocator in a cluster."""
    wait_for(ray_head, "import ray; ray.init(address='auto', logging_level='ERROR')")
    monitor = container_name()
    podman("run", "-d", "--name", monitor, f"--network=container:{ray_head}", "-v", VALUES,
           "-e", "RAY_AUTH_MODE=disabled", MONITOR, "--inventory-file", "/values/inventory-example.yaml",
           "--node", "gpu-2", "--host", "127.0.0.1", "--port", "9401", "--ray-address", "ray://127.0.0.1:10001",
           "--interval", "1")  # fmt: skip
    state = wait_for(
        ray_head,
        "import json, ray\n"
        "from vram_scheduler.allocator.actor import AllocatorClient\n"
        "from vram_scheduler.core.ray_names import NAMESPACE\n"
        "ray.init(address='auto', namespace=NAMESPACE, logging_level='ERROR')\n"
        "state = AllocatorClient().vram_state().model_dump(mode='json')\n"
        "assert 'gpu-2' in {g['node'] for g in state['gpus']}, state\n"
        "print(json.dumps(state))",
        timeout=120,
    )
    gpus = [g for g in json.loads(state.strip().splitlines()[-1])["gpus"] if g["node"] == "gpu-2"]
    assert [g["uuid"] for g in gpus] == ["GPU-22222222-0000-0000-0000-000000000000"]
