"""`engine_kwargs` against the installed vLLM's own `vllm serve` parser: every option string vLLM maps
to an argument ray-vram sets or guards is refused by the schema in every spelling a key can take, and
no spelling the schema lets through reaches a guarded argument in vLLM (prefixes included)."""

from __future__ import annotations

import argparse
from functools import cache

import pytest
from pydantic import ValidationError

from vram_scheduler.core.config import GIB, ModelSpec, ServingSettings, check_remote_code, parse_config
from vram_scheduler.core.engine_guard import CODE_LOADING_ENGINE_ARGS, OWNED_ENGINE_ARGS
from vram_scheduler.serving.replica.engine_args import EngineArgsError, parse_server_args, server_argv
from vram_scheduler.serving.replica.sizing import size_engine

#: Guarded destinations this vLLM has no option for (positional, or added in other releases).
NOT_AN_OPTION = {"model_tag"}


@cache
def vllm_parser() -> argparse.ArgumentParser:
    """vLLM's parser as vLLM builds it (prefixes allowed: what ray-vram must not rely on)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vram_scheduler.serving.replica.vllm_compat import server_cli_args

    return server_cli_args().make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def options_by_dest() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for action in vllm_parser()._actions:
        found.setdefault(action.dest, []).extend(action.option_strings)
    return found


def spellings(option: str) -> set[str]:
    """Every engine_kwargs key that names `option`: as given, without dashes, dashes <-> underscores."""
    bare = option.lstrip("-")
    return {option, bare, bare.replace("-", "_"), bare.replace("_", "-"), "--" + bare.replace("-", "_")}


def guarded_spellings(table: dict[str, str]) -> list[tuple[str, str]]:
    by_dest = options_by_dest()
    return sorted(
        (dest, key)
        for dest in table
        if dest not in NOT_AN_OPTION
        for option in by_dest[dest]
        for key in spellings(option)
    )


def spec(**engine_kwargs: object) -> ModelSpec:
    return ModelSpec(model_id="m", model="/models/m", vram_gb=1, engine_kwargs=engine_kwargs)


def test_every_guarded_argument_exists_in_this_vllm() -> None:
    guarded = set(OWNED_ENGINE_ARGS) | set(CODE_LOADING_ENGINE_ARGS)
    missing = sorted(guarded - set(options_by_dest()) - NOT_AN_OPTION)
    assert not missing, f"guarded arguments this vLLM does not have (renamed?): {missing}"


def test_new_code_loading_arguments_are_noticed() -> None:
    """Arguments named like class, plugin, middleware or processor imports are all in the table."""
    suspicious = {
        dest
        for dest in options_by_dest()
        if dest.endswith(("_cls", "_plugin", "_processors", "middleware")) or "remote_code" in dest
    }
    assert suspicious - set(CODE_LOADING_ENGINE_ARGS) == set()


@pytest.mark.parametrize(("dest", "key"), guarded_spellings(OWNED_ENGINE_ARGS))
def test_owned_arguments_are_refused_in_every_spelling(dest: str, key: str) -> None:
    value = True if key.lstrip("-").startswith("no") and dest not in key.replace("-", "_") else 1
    with pytest.raises(ValidationError) as refused:
        spec(**{key: value})
    assert dest in str(refused.value) and "remove it" in str(refused.value)


@pytest.mark.parametrize(("dest", "key"), guarded_spellings(CODE_LOADING_ENGINE_ARGS))
def test_code_loading_arguments_need_allow_remote_code_in_every_spelling(dest: str, key: str) -> None:
    if key.lstrip("-").replace("-", "_").startswith("no_"):
        # The negative form turns the feature off: allowed, and vLLM reads it as off.
        assert spec(**{key: True}).remote_code() == []
        return
    model = {"model_id": "m", "model": "/models/m", "vram_gb": 1, "engine_kwargs": {key: "x.Y"}}
    with pytest.raises(Exception, match="allow_remote_code"):
        parse_config({"models": [model]})
    with pytest.raises(Exception, match="allow_remote_code"):
        check_remote_code(spec(**{key: "x.Y"}), ServingSettings())
    allowed = parse_config({"models": [model], "serving": {"allow_remote_code": True}})
    assert allowed.models[0].remote_code(), "still reported, only allowed"


def test_json_sub_keys_that_import_code() -> None:
    for kwargs in ({"compilation_config": {"backend": "evil.Backend"}}, {"compilation-config.backend": "evil.B"}):
        assert "compilation_config.backend" in spec(**kwargs).remote_code()[0]
    assert spec(compilation_config={"mode": 0}).remote_code() == []
    assert spec(**{"kv-transfer-config.kv_connector_module_path": "evil"}).remote_code()


def budget():
    return size_engine("m", 2 * GIB, "cpu", 24 * GIB)


def test_a_prefix_of_a_guarded_flag_does_not_reach_it() -> None:
    """vLLM's own parser takes prefixes (`--gpu-memory-util`); the replica's parser does not."""
    assert vllm_parser().parse_args(["/m", "--gpu-memory-util", "0.95"]).gpu_memory_utilization == 0.95
    sneaky = spec(gpu_memory_util=0.95)  # not a guarded name: the schema lets it through ...
    with pytest.raises(EngineArgsError, match="gpu-memory-util"):  # ... and vLLM, as ray-vram runs it, refuses it
        parse_server_args(server_argv(sneaky, "/models/m", budget()))


def test_the_replica_checks_again_before_vllm_sees_anything() -> None:
    """A spec that skipped validation (model_construct) is refused where the replica builds vLLM's flags."""
    for kwargs in ({"gpu-memory-utilization": 0.95}, {"--trust-remote-code": True}):
        unchecked = ModelSpec.model_construct(model_id="m", model="/m", vram_gb=1, engine_kwargs=kwargs)
        with pytest.raises(EngineArgsError, match="engine_kwargs refused"):
            server_argv(unchecked, "/models/m", budget())
    trusted = parse_config(
        {
            "models": [{"model_id": "m", "model": "/m", "vram_gb": 1, "engine_kwargs": {"trust-remote-code": True}}],
            "serving": {"allow_remote_code": True},
        }
    ).models[0]
    args = parse_server_args(server_argv(trusted, "/models/m", budget(), allow_remote_code=True))
    assert args.trust_remote_code is True


def test_spellings_are_normalised_and_duplicates_refused() -> None:
    assert spec(**{"--enforce-eager": True, "max-num-seqs": 4}).engine_kwargs == {
        "enforce_eager": True,
        "max_num_seqs": 4,
    }
    with pytest.raises(ValidationError, match="same engine argument"):
        spec(**{"max-num-seqs": 4, "max_num_seqs": 8})
    args = parse_server_args(
        server_argv(spec(**{"--enforce-eager": True, "no-enable-prefix-caching": True}), "/m", budget())
    )
    assert args.enforce_eager is True and args.enable_prefix_caching is False
