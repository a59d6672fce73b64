"""Local mode's safety settings without starting anything: the installation's Ray token, Ray's auth
environment, and the OpenAI endpoint's exposure (the running stack is checked in
tests/sdk/test_local_exposure.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from vram_scheduler.core.config import ConfigError, parse_config
from vram_scheduler.core.installation import config_dir
from vram_scheduler.core.loopback import is_loopback_host
from vram_scheduler.local.stack import TOKEN_FILE, ensure_ray_token, local_serving, ray_auth_env


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_token_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = ensure_ray_token(tmp_path / "ray-vram")
    token = path.read_text()
    assert path.name == TOKEN_FILE and len(token) == 64 and int(token, 16) >= 0
    assert (mode(path), mode(path.parent)) == (0o600, 0o700)
    assert ensure_ray_token(tmp_path / "ray-vram").read_text() == token
    assert list(path.parent.iterdir()) == [path]


def test_a_token_readable_by_others_is_narrowed_and_an_empty_one_refilled(tmp_path: Path) -> None:
    path = ensure_ray_token(tmp_path)
    token = path.read_text()
    path.chmod(0o644)
    assert ensure_ray_token(tmp_path).read_text() == token and mode(path) == 0o600
    path.write_text("")
    assert len(ensure_ray_token(tmp_path).read_text()) == 64 and mode(path) == 0o600


def test_config_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config_dir() == tmp_path / "ray-vram"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_dir() == tmp_path / "home" / ".config" / "ray-vram"


def test_ray_auth_is_on_unless_turned_off_explicitly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    expected = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray-vram" / TOKEN_FILE)}
    assert ray_auth_env({}) == expected
    assert ray_auth_env({"RAY_AUTH_MODE": "token"}) == expected
    assert ray_auth_env({"RAY_AUTH_MODE": "Disabled"}) == {}


def test_local_endpoint_is_on_loopback_unless_the_values_say_otherwise() -> None:
    assert local_serving(parse_config({}), {}).host == "127.0.0.1"
    assert local_serving(parse_config({"serving": {"host": "::1"}}), {}).host == "::1"


def test_an_exposed_local_endpoint_needs_a_key_in_the_environment() -> None:
    config = parse_config({"serving": {"host": "0.0.0.0", "api_key_env": "MY_KEY"}})
    with pytest.raises(ConfigError) as caught:
        local_serving(config, {"MY_KEY": " "})
    (problem,) = caught.value.problems
    assert "serving.host = '0.0.0.0'" in problem and "MY_KEY holds no API key" in problem
    assert local_serving(config, {"MY_KEY": "secret"}).host == "0.0.0.0"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("example.org", False)],
)  # fmt: skip
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_local_mode_makes_the_internal_key_when_none_is_set_and_keeps_a_given_one() -> None:
    """Made before Ray starts, so every Ray process of the local cluster inherits it."""
    from vram_scheduler.serving.internal_key import INTERNAL_KEY_ENV, InternalKeyMissing, ensure_internal_key

    environ: dict[str, str] = {}
    key = ensure_internal_key(environ)
    assert environ[INTERNAL_KEY_ENV] == key and len(key) == 64 and int(key, 16) >= 0
    assert ensure_internal_key(environ) == key and ensure_internal_key({}) != key
    given = {INTERNAL_KEY_ENV: "a-key-the-operator-set"}
    assert ensure_internal_key(given) == "a-key-the-operator-set"
    with pytest.raises(InternalKeyMissing, match=f"{INTERNAL_KEY_ENV} is 3 characters, fewer than 16"):
        ensure_internal_key({INTERNAL_KEY_ENV: "abc"})
