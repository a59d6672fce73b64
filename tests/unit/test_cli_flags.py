"""One flag vocabulary across `ray-vram`'s sub-commands (issue 12), read off the real parsers:
-f/--values is the values file, --output is table|json, --address is the serving controller and
--ray-address a Ray cluster. Former spellings still parse to the same values and warn on stderr."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

import vram_scheduler
from vram_scheduler.cli.commands.check import stress_address
from vram_scheduler.cli.commands.options import ray_address
from vram_scheduler.cli.main import build_parser
from vram_scheduler.core.config import ConfigError
from vram_scheduler.core.flags import DeprecatedAlias

VALUES_COMMANDS = {"plan", "up", "deploy", "serve"}
CONTROLLER_COMMANDS = {"status", "deploy", "shutdown", "sleep", "wake", "check"}
RAY_COMMANDS = {"serve", "check", "monitor"}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Each sub-command's parser, as `ray-vram` builds it."""
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options --help shows (deprecated aliases are hidden)."""
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and a.option_strings]


def with_flag(flag: str) -> dict[str, argparse.Action]:
    """Command → its visible action spelled `flag`."""
    found = {}
    for name, parser in subcommands().items():
        for action in visible(parser):
            if flag in action.option_strings:
                found[name] = action
    return found


def test_the_walk_sees_every_command() -> None:
    assert {"plan", "up", "serve", "deploy", "status", "shutdown", "check", "monitor", "node-start"} <= set(
        subcommands()
    )


def test_every_values_file_is_dash_f_or_values() -> None:
    holders = {}
    for name, parser in subcommands().items():
        for action in visible(parser):
            if action.dest in {"values", "file", "config"} or {"--file", "--config"} & set(action.option_strings):
                holders[name] = action.option_strings
    assert holders == {name: ["-f", "--values"] for name in VALUES_COMMANDS}


def test_every_output_is_table_or_json_default_table() -> None:
    outputs = with_flag("--output")
    assert {"plan", "deploy", "status", "shutdown", "check", "monitor", "node-start", "measure"} <= set(outputs)
    for name, action in outputs.items():
        assert (name, list(action.choices or []), action.default) == (name, ["table", "json"], "table")


def test_address_is_always_the_serving_controller() -> None:
    addresses = with_flag("--address")
    assert set(addresses) == CONTROLLER_COMMANDS
    for name, action in addresses.items():
        assert action.dest == "address", name
        assert action.help.startswith("the serving controller"), (name, action.help)
        assert "$RAY_VRAM_CONTROLLER" in action.help and "$RAY_ADDRESS" not in action.help, (name, action.help)


def test_ray_address_is_always_a_ray_cluster() -> None:
    addresses = with_flag("--ray-address")
    assert set(addresses) == RAY_COMMANDS
    for name, action in addresses.items():
        assert action.dest == "ray_address" and "Ray cluster" in action.help, (name, action.help)
        assert "$RAY_VRAM_CONTROLLER" not in action.help, (name, action.help)
    # the commands that join Ray themselves default to $RAY_ADDRESS; the monitor publishes only when told
    assert "default $RAY_ADDRESS, else auto" in addresses["serve"].help
    assert "default $RAY_ADDRESS, else auto" in addresses["check"].help
    assert "nothing is published" in addresses["monitor"].help


def test_every_hidden_option_is_a_deprecated_alias() -> None:
    for name, parser in subcommands().items():
        hidden = [a for a in parser._actions if a.help == argparse.SUPPRESS and a.option_strings]
        assert all(isinstance(a, DeprecatedAlias) for a in hidden), (name, [a.option_strings for a in hidden])


DEPRECATED = [
    (["deploy", "--file", "v.yaml"], ["deploy", "-f", "v.yaml"], ["--file is deprecated; use -f/--values"]),
    (["serve", "--config", "c.yaml"], ["serve", "--values", "c.yaml"], ["--config is deprecated; use -f/--values"]),
    (
        ["serve", "-f", "c.yaml", "--address", "head:6379"],
        ["serve", "-f", "c.yaml", "--ray-address", "head:6379"],
        ["--address is deprecated; use --ray-address"],
    ),
    (["shutdown", "--output", "text"], ["shutdown", "--output", "table"], ["--output text is deprecated"]),
    (
        ["node-start", "--dry-run", "--output=text", "head"],
        ["node-start", "--dry-run", "head"],
        ["--output text is deprecated; use --output table"],
    ),
    (["monitor", "--once", "--output", "text"], ["monitor", "--once"], ["--output text is deprecated"]),
    (["status", "--output", "text"], ["status"], ["--output text is deprecated"]),
]


@pytest.mark.parametrize(("old", "new", "warnings"), DEPRECATED, ids=[" ".join(case[0]) for case in DEPRECATED])
def test_a_deprecated_spelling_parses_the_same_and_warns(
    old: list[str], new: list[str], warnings: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    canonical = vars(parser.parse_args(new))
    assert capsys.readouterr().err == "", "the canonical spelling warns about nothing"
    assert vars(parser.parse_args(old)) == canonical
    err = capsys.readouterr().err
    for warning in warnings:
        assert f"warning: {warning}" in err


def test_a_required_values_file_is_satisfied_by_its_alias_but_not_twice(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as missing:
        parser.parse_args(["serve"])
    assert missing.value.code == 2 and "-f/--values" in capsys.readouterr().err
    with pytest.raises(SystemExit) as both:
        parser.parse_args(["serve", "-f", "a.yaml", "--config", "b.yaml"])
    assert both.value.code == 2 and "not allowed with argument -f/--values" in capsys.readouterr().err


def test_check_stress_takes_its_ray_address_from_ray_address_or_the_old_address(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    parser = build_parser()
    assert stress_address(parser.parse_args(["check", "--stress", "--ray-address", "head:6379"])) == "head:6379"
    assert stress_address(parser.parse_args(["check", "--stress"])) == "auto"
    assert capsys.readouterr().err == ""
    assert stress_address(parser.parse_args(["check", "--stress", "--address", "head:6379"])) == "head:6379"
    assert "warning: --address with --stress is deprecated; use --ray-address" in capsys.readouterr().err
    # --address is the controller: with --ray-address given too, --stress leaves it alone
    both = ["check", "--stress", "--address", "http://ctl:8080", "--ray-address", "head:6379"]
    assert stress_address(parser.parse_args(both)) == "head:6379"


@pytest.mark.parametrize("flag", ["--address", "--ray-address"])
def test_check_stress_refuses_an_http_url_for_ray(flag: str) -> None:
    args = build_parser().parse_args(["check", "--stress", flag, "http://127.0.0.1:8080"])
    with pytest.raises(ConfigError, match=r"give the Ray address \(host:6379\)") as error:
        stress_address(args)
    assert str(error.value).startswith(f"{flag}: ")


def test_ray_address_defaults_to_the_environment_then_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_address(None) == "ray://head:10001"
    assert ray_address("head:6379") == "head:6379"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # the dashboard URL that `ray job submit` reads
    with pytest.raises(ConfigError, match=r"^\$RAY_ADDRESS: "):
        ray_address(None)


def test_no_command_returns_an_exit_code_literal() -> None:
    """Exit codes are `ExitCode` members (CONTRIBUTING.md); a bare number in a return or exit is a slip."""
    package = Path(vram_scheduler.__file__).parent
    slips = []
    for path in [package / "cli" / "main.py", *sorted((package / "cli" / "commands").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Return) else None
            if isinstance(node, ast.Call) and ast.unparse(node.func) in {"sys.exit", "exit"} and node.args:
                value = node.args[0]
            if isinstance(value, ast.Constant) and isinstance(value.value, int) and not isinstance(value.value, bool):
                slips.append(f"{path.name}:{node.lineno}")
    assert slips == []
