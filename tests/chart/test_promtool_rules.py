"""The chart's alert rules through Prometheus' own tool: `promtool check rules` on the rendered
PrometheusRule, and `promtool test rules` on tests/chart/promtool/alerts-test.yaml, which shows
every alert firing on series that should fire it and silent on series that should not. The test
series must be ones the exporters really emit (names and label names), or the unit tests would
prove rules over series that never exist: the monitor's here (its real registry), the serving
controller's in tests/monitor/test_prometheus_scrape.py, where a real controller runs."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import promql_parser
import promstack
import pytest
import yaml
from exporters import replica_monitor_metrics, series_labels

from .helm import CHART, ROOT, render
from .test_dashboards import controller_metrics

PROMTOOL_TESTS = sorted((ROOT / "tests" / "chart" / "promtool").glob("*-test.yaml"))
#: The alert tests' `for` durations and thresholds are the ones of this CI scenario.
MONITORING_VALUES = CHART / "ci" / "monitoring-values.yaml"


@cache
def rule_groups(values: tuple[Path, ...] = (MONITORING_VALUES,), sets: tuple[str, ...] = ()) -> list[dict]:
    """The `groups` of the rendered PrometheusRule (the rule-file format promtool reads)."""
    docs = render(values=values, sets=["monitoring.prometheusOperator=always", *sets])
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return rule["spec"]["groups"]


def alert_names() -> set[str]:
    return {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promstack.tools().promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """rules.yaml from the chart, beside a copy of the promtool tests that name it."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    for path in PROMTOOL_TESTS:
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def test_promtool_accepts_the_rules(rules_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert len(alert_names()) == 8
    result = promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout
    # The chart's default values (longer `for`, staleness threshold) render valid rules too.
    defaults = tmp_path_factory.mktemp("defaults") / "rules.yaml"
    defaults.write_text(yaml.safe_dump({"groups": rule_groups(values=())}, sort_keys=False))
    result = promtool("check", "rules", str(defaults), cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_every_alert_pass(rules_dir: Path) -> None:
    result = promtool("test", "rules", *(path.name for path in PROMTOOL_TESTS), cwd=rules_dir)
    assert result.returncode == 0, f"promtool test rules failed:\n{result.stdout}{result.stderr}"


def promtool_cases() -> list[dict]:
    """Every test group of the promtool test files."""
    return [group for path in PROMTOOL_TESTS for group in yaml.safe_load(path.read_text())["tests"]]


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    firing, silent = set(), set()
    for group in promtool_cases():
        for case in group.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    assert firing == alert_names(), f"alerts never shown firing: {sorted(alert_names() - firing)}"
    assert silent == alert_names(), f"alerts never shown silent: {sorted(alert_names() - silent)}"


#: Labels Prometheus adds to every series of a target (the Prometheus Operator's ServiceMonitor
#: relabelling), which no exporter emits itself.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "service", "endpoint", "pod", "container"})


def input_series_problems(exported: dict[str, set[str]], names: set[str] | None = None) -> list[str]:
    """Where the promtool tests' input series (of `names`, default all) differ from `exported`
    (series name → label names): a name no exporter emits, or other label names (target labels aside)."""
    problems = []
    for group in promtool_cases():
        for item in group["input_series"]:
            selector = promql_parser.parse(item["series"])
            name = selector.name
            if names is not None and name not in names:
                continue
            labels = {m.name for m in selector.matchers.matchers} - {"__name__"} - TARGET_LABELS
            if name not in exported:
                problems.append(f"{item['series']}: no exporter emits {name}")
            elif labels != exported[name]:
                problems.append(f"{item['series']}: labels {sorted(labels)}, the exporter's {sorted(exported[name])}")
    return problems


def test_promtool_input_series_are_what_the_monitor_emits() -> None:
    """Every input series but the controller's (checked against a running controller elsewhere)."""
    exported = series_labels(replica_monitor_metrics().render().decode())
    controller = controller_metrics()
    assert not controller & set(exported)
    names = {promql_parser.parse(i["series"]).name for g in promtool_cases() for i in g["input_series"]} - controller
    problems = input_series_problems(exported, names)
    assert not problems, "\n".join(problems)
