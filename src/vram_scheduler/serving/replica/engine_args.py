"""vLLM server arguments for one replica: the model spec, its budget, and ray-vram's fixed choices.

Arguments go through vLLM's own command-line parser, so a replica's engine and OpenAI layer are
configured exactly as `vllm serve` would configure them from the same flags, and a bad
`engine_kwargs` entry fails with vLLM's message naming the flag.

A model's `media` settings become vLLM's multimodal flags (text-only models ignore them): items per
prompt (which bound the encoder's profiled memory), the processor cache, and where images may come
from. With no `media.media_domains`, vLLM is given the reserved domain `invalid` (RFC 2606), which
no URL matches: a replica called directly downloads nothing either.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, NoReturn

from ...core.config import MediaSettings, ModelSpec
from ...core.engine_guard import code_loading_engine_args, normalise_engine_kwargs, owned_engine_args
from ...core.errors import RayVramError
from .sizing import EngineBudget


class EngineArgsError(RayVramError, ValueError):
    """An `engine_kwargs` entry vLLM does not accept."""


def engine_flag(key: str, value: Any) -> list[str]:
    """One engine argument as vLLM's command line spells it (`--key value`, `--key` / `--no-key`)."""
    name = "--" + key.replace("_", "-")
    if value is True:
        return [name]
    if value is False:
        return ["--no-" + key.replace("_", "-")]
    if value is None:
        return []
    if isinstance(value, dict):
        return [name, json.dumps(value)]
    if isinstance(value, list | tuple):
        return [name, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
    return [name, str(value)]


#: A domain no URL can have (RFC 2606): vLLM's allowed_media_domains when none is allowed.
NO_MEDIA_DOMAIN = "invalid"


def media_kwargs(media: MediaSettings) -> dict[str, Any]:
    """vLLM's multimodal engine arguments for `media` (see module docstring)."""
    kwargs: dict[str, Any] = {
        "limit_mm_per_prompt": {"image": media.images_per_prompt, "audio": media.audios_per_prompt, "video": 0},
        "mm_processor_cache_gb": media.processor_cache_gb,
        "allowed_media_domains": media.media_domains or [NO_MEDIA_DOMAIN],
    }
    if media.local_media_dir:
        kwargs["allowed_local_media_path"] = media.local_media_dir
    return kwargs


def server_argv(
    spec: ModelSpec,
    model_source: str,
    budget: EngineBudget,
    engine_metrics: bool = True,
    allow_remote_code: bool = False,
) -> list[str]:
    """The `vllm serve` flags for a replica of `spec` (`engine_metrics`: keep vLLM's statistics on).
    The engine arguments are checked once more here, the last step before vLLM sees them: a spec that
    reached a replica without passing the schema (built with `model_construct`, say) is refused too."""
    extra = normalise_engine_kwargs(spec.engine_kwargs)
    problems = owned_engine_args(extra) + ([] if allow_remote_code else code_loading_engine_args(extra))
    if problems:
        raise EngineArgsError(f"model {spec.model_id}: engine_kwargs refused: " + "; ".join(problems))
    kwargs: dict[str, Any] = {
        "model": model_source,
        "served_model_name": spec.names,
        "max_model_len": spec.max_model_len,
        "disable_uvicorn_access_log": True,
        **({} if engine_metrics else {"disable_log_stats": True}),  # vLLM's flag has no negative form
        **budget.engine_kwargs(),
        **media_kwargs(spec.media),
    }
    # spec.max_tokens is applied by the router to requests without max_tokens: vLLM's
    # generation-config default would cap every request at it instead.
    kwargs.update(extra)
    argv: list[str] = []
    for key, value in kwargs.items():
        argv += engine_flag(key, value)
    return argv


def parse_server_args(argv: list[str]) -> argparse.Namespace:
    """Parse with vLLM's own `vllm serve` parser; errors name the offending flag."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from .vllm_compat import server_cli_args

    cli_args = server_cli_args()
    parser = cli_args.make_arg_parser(FlexibleArgumentParser(prog="ray-vram replica", exit_on_error=False))

    def refuse(message: str) -> NoReturn:  # argparse would print it to stderr and exit with code 2
        raise argparse.ArgumentError(None, message)

    parser.error = refuse  # type: ignore[method-assign]
    # No prefixes: `--gpu-memory-util` must not reach --gpu-memory-utilization past ray-vram's guards.
    parser.allow_abbrev = False
    try:
        args = parser.parse_args(argv)
        cli_args.validate_parsed_serve_args(args)
    except (argparse.ArgumentError, SystemExit, TypeError, ValueError) as error:
        raise EngineArgsError(f"vLLM rejected the engine arguments {argv}: {error}") from None
    return args
