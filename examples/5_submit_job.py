"""Submit a job to the Ray cluster through Ray's Jobs REST API, with the cluster's auth token.

Ray ≥ 2.52 protects the dashboard and the Jobs API with a token (RAY_AUTH_MODE=token; the chart
turns it on): an unauthenticated Jobs API would let anyone who reaches it run code. The token
is sent as `Authorization: Bearer <token>` and read the way Ray reads it: $RAY_AUTH_TOKEN, the
file named by $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token.

    python examples/5_submit_job.py                          # local dashboard, a probe job
    python examples/5_submit_job.py --address http://ray-head:8265 -- python train.py --epochs 1
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import httpx

DEFAULT_ENTRYPOINT = "python -c \"import ray; ray.init(); print('cluster CPUs:', ray.cluster_resources().get('CPU'))\""
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def auth_token() -> str | None:
    """The cluster token, looked up like Ray does; None when the cluster runs without one."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def jobs_client(address: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=address.rstrip("/"), headers=headers, timeout=120)


def submit(client: httpx.Client, entrypoint: str, metadata: dict[str, str] | None = None) -> str:
    response = client.post("/api/jobs/", json={"entrypoint": entrypoint, "metadata": metadata or {}})
    if response.status_code in (401, 403):
        raise SystemExit(
            f"the Jobs API at {client.base_url} refused the token (HTTP {response.status_code}): "
            "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token"
        )
    response.raise_for_status()
    return response.json()["submission_id"]


def wait(client: httpx.Client, submission_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        info = client.get(f"/api/jobs/{submission_id}").raise_for_status().json()
        if info["status"] != last:
            print(f"job {submission_id}: {info['status']}", file=sys.stderr)
            last = info["status"]
        if info["status"] in FINAL:
            return info
        if time.monotonic() > deadline:
            client.post(f"/api/jobs/{submission_id}/stop")
            raise SystemExit(f"job {submission_id} still {info['status']} after {timeout_s:.0f}s; stopped it")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_address = os.environ.get("RAY_ADDRESS", "")
    parser.add_argument(
        "--address",
        default=default_address if default_address.startswith("http") else "http://127.0.0.1:8265",
        help="Ray dashboard URL (default $RAY_ADDRESS if it is a URL, else http://127.0.0.1:8265)",
    )
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="command to run (after --)")
    args = parser.parse_args(argv)
    command = [part for part in args.entrypoint if part != "--"]
    entrypoint = shlex.join(command) if command else DEFAULT_ENTRYPOINT
    try:
        with jobs_client(args.address, auth_token()) as client:
            submission_id = submit(client, entrypoint, {"submitted_by": "ray-vram example"})
            info = wait(client, submission_id, args.timeout)
            logs = client.get(f"/api/jobs/{submission_id}/logs").raise_for_status().json()["logs"]
    except httpx.HTTPError as error:
        print(f"error: the Jobs API at {args.address}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(logs, end="" if logs.endswith("\n") else "\n")
    if info["status"] != "SUCCEEDED":
        print(f"job {submission_id} {info['status']}: {info.get('message')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
