"""`ray-vram ensure-secret`: the chart's hook Job that creates the release's generated Secret (see
`kube_secret`): missing keys generated, existing ones never changed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...core.config import ConfigError
from ...core.exit_codes import ExitCode


def register(subparsers: argparse._SubParsersAction) -> None:
    from ...tools.kube_secret import IN_CLUSTER_API, SERVICE_ACCOUNT

    parser = subparsers.add_parser(
        "ensure-secret",
        help="(Kubernetes) create a Secret's missing random keys, keep the ones it has",
        description="Make the Secret NAME hold every --key: values it has are kept, missing ones get 64 random\n"
        "hex digits (or the value of --copy's source when that exists). Run by the chart's\n"
        "pre-install/pre-upgrade hook with its service account, so rendered manifests carry no random data.\n\n"
        "exit codes: 0 done, 1 the API server refused or failed, 2 invalid arguments\n\n"
        "example:\n"
        "  ray-vram ensure-secret --name rv-ray-vram-auth --key controller-token --key internal-key \\\n"
        "      --copy api-key=rv-ray-vram-api-key/api-key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", required=True, help="the Secret")
    parser.add_argument("--namespace", help="its namespace (default: the pod's own)")
    parser.add_argument("--key", action="append", required=True, help="a data key it must hold (repeatable)")
    parser.add_argument(
        "--copy",
        action="append",
        default=[],
        metavar="KEY=SECRET/KEY",
        help="take a missing KEY from another Secret of the namespace when it has it (an earlier release's)",
    )
    parser.add_argument("--label", action="append", default=[], metavar="K=V", help="label of a created Secret")
    parser.add_argument("--api-server", default=IN_CLUSTER_API, help=f"API server URL (default {IN_CLUSTER_API})")
    parser.add_argument("--token-file", type=Path, default=SERVICE_ACCOUNT / "token", help="bearer token file")
    parser.add_argument("--ca-file", type=Path, default=SERVICE_ACCOUNT / "ca.crt", help="API server CA bundle")
    parser.set_defaults(func=run)


def _pairs(items: list[str], flag: str, separator: str = "=") -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition(separator)
        if not sep or not key or not value:
            raise ConfigError(flag, [f"{item!r} is not {flag.upper()}{separator}VALUE"])
        pairs[key] = value
    return pairs


def run(args: argparse.Namespace) -> int:
    from ...tools.kube_secret import SERVICE_ACCOUNT, KubeAPI, KubeSecretError, ensure_secret

    copies = {}
    for key, source in _pairs(args.copy, "--copy").items():
        secret, sep, source_key = source.partition("/")
        if not sep or not secret or not source_key:
            raise ConfigError("--copy", [f"{key}={source}: the source must be SECRET/KEY"])
        copies[key] = (secret, source_key)
    namespace = args.namespace or (SERVICE_ACCOUNT / "namespace").read_text().strip()
    api = KubeAPI(server=args.api_server, token_file=args.token_file, ca_file=args.ca_file)
    try:
        result = ensure_secret(api, namespace, args.name, args.key, copies, _pairs(args.label, "--label"))
    except (KubeSecretError, OSError) as error:
        print(f"error: Secret {namespace}/{args.name}: {error}", file=sys.stderr)
        return ExitCode.FAILURE
    print(json.dumps({"secret": f"{namespace}/{args.name}"} | result))  # key names only, never values
    return ExitCode.OK
