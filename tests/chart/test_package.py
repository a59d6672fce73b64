"""The chart's packaging: README generated from commented values, the vendored kuberay-operator
dependency is the 1.7.0 release data, and Helm sees the dependency as satisfied."""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys

import pytest

from .helm import CHART, ROOT, SHARED_KUBERAY, kuberay_chart_files, load, run, tools


def chart_docs():
    spec = importlib.util.spec_from_file_location("chart_docs", ROOT / "ci" / "chart-docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_readme_is_generated_from_values_comments() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "chart-docs.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    readme = (CHART / "README.md").read_text()
    assert "| `models` |" in readme and "| `gpu.mode` |" in readme


def test_every_values_key_is_commented() -> None:
    docs = chart_docs()
    keys = docs.parse_keys((CHART / "values.yaml").read_text())
    assert len(keys) > 60
    assert docs.undocumented(keys) == []


def test_an_uncommented_key_is_reported() -> None:
    docs = chart_docs()
    text = "# -- documented\na: 1\nsection:\n  # -- inner\n  b: 2\n  c: 3\nlisted:\n  - {x: 1}\n"
    assert docs.undocumented(docs.parse_keys(text)) == ["section", "section.c", "listed"]
    documented_parent = "# -- resources\nres:\n  requests:\n    cpu: 1\n"
    assert docs.undocumented(docs.parse_keys(documented_parent)) == []


def test_dependency_is_vendored_and_locked() -> None:
    chart = load((CHART / "Chart.yaml").read_text())
    lock = load((CHART / "Chart.lock").read_text())
    (dep,) = chart["dependencies"]
    assert dep["condition"] == "kuberay-operator.enabled"
    assert lock["dependencies"] == [{k: dep[k] for k in ("name", "repository", "version")}]
    listed = run([tools().helm, "dependency", "list", str(CHART)]).stdout
    assert "kuberay-operator" in listed and "ok" in listed.split("kuberay-operator", 1)[1].splitlines()[0], listed
    files = kuberay_chart_files()
    assert load(files["kuberay-operator/Chart.yaml"])["version"] == "1.7.0"


@pytest.mark.skipif(not SHARED_KUBERAY.is_dir(), reason="the KubeRay reference data sits beside the clone in CI only")
def test_vendored_chart_matches_the_kuberay_release_data() -> None:
    files = kuberay_chart_files()
    assert files["kuberay-operator/values.yaml"] == (SHARED_KUBERAY / "kuberay-operator-values.yaml").read_bytes()
    for crd in sorted((SHARED_KUBERAY / "crds").glob("*.yaml")):
        assert files[f"kuberay-operator/crds/{crd.name}"] == crd.read_bytes(), crd.name
        assert gzip.decompress((CHART / "crds-upgrade" / f"{crd.name}.gz").read_bytes()) == crd.read_bytes()


def test_helm_test_script_fails_naming_what_is_missing(tmp_path) -> None:
    """The `helm test` pod's script, run as the pod runs it, against an endpoint that is not there."""
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": [{"model_id": "tiny"}], "placement": {}, "serving": {}}))
    env = {
        "OPENAI_URL": f"http://127.0.0.1:{port}",
        "CONTROLLER_URL": f"http://127.0.0.1:{port}",
        "CONFIG_JSON": str(config),
        "TIMEOUT_S": "1",
        "PATH": "/usr/bin:/bin",
    }
    script = CHART / "files" / "helm-test.py"
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "FAIL /v1/models lists ['tiny']" in result.stderr and "Connection refused" in result.stderr, result.stderr
