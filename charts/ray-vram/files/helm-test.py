"""`helm test` check of a ray-vram release: the endpoint lists every model, each model answers one
completion, and the controller's allocator view holds a reservation for every running replica.
A declared model with pending replicas (no room on any GPU) fails the test at once, with the
controller's reason for each.

Standard library only, so it runs in any image with python3. Configured by environment:
OPENAI_URL, CONTROLLER_URL, CONTROLLER_TOKEN, API_KEY (may be empty), CONFIG_JSON (the release's configuration
as JSON: its models are checked), TIMEOUT_S.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request


def call(url, body=None, key="", timeout=30.0):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def wait_for(what, check, deadline):
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result is not None:
                return result
        except (urllib.error.URLError, OSError, ValueError, KeyError) as error:
            last = error
        time.sleep(5)
    raise SystemExit(f"FAIL {what}: not true before the deadline (last error: {last})")


def fail_on_pending(controller):
    """Exit failing, naming each pending replica and why, when the controller lists any."""
    pending = [
        (model["model_id"], replica)
        for model in call(f"{controller}/v1/deployments").get("models", [])
        for replica in model.get("replicas", [])
        if replica.get("state") == "pending"
    ]
    if pending:
        lines = [
            f"  {model_id}: {r['replica_id']} pending: {r.get('reason') or 'no reason given'}"
            for model_id, r in pending
        ]
        raise SystemExit(f"FAIL {len(pending)} declared replica(s) are pending (not placed):\n" + "\n".join(lines))


def main():
    openai, controller = os.environ["OPENAI_URL"].rstrip("/"), os.environ["CONTROLLER_URL"].rstrip("/")
    key = os.environ.get("API_KEY", "")
    with open(os.environ["CONFIG_JSON"]) as config:
        models = [model["model_id"] for model in json.load(config).get("models", [])]
    deadline = time.monotonic() + float(os.environ.get("TIMEOUT_S", "300"))

    def listed():
        ids = {m["id"] for m in call(f"{openai}/v1/models", key=key)["data"]}
        if set(models) <= ids:
            return ids
        fail_on_pending(controller)
        return None

    ids = wait_for(f"/v1/models lists {models}", listed, deadline)
    print(f"ok /v1/models lists {sorted(ids)}")
    for model in models:
        body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
        answer = wait_for(
            f"completion from {model}", lambda b=body: call(f"{openai}/v1/chat/completions", b, key, 120), deadline
        )
        if not answer.get("choices"):
            raise SystemExit(f"FAIL completion from {model}: no choices in {answer}")
        print(f"ok {model} answered ({answer.get('usage', {}).get('completion_tokens', '?')} tokens)")
    token = os.environ.get("CONTROLLER_TOKEN", "")
    deployments = call(f"{controller}/v1/deployments", key=token)
    vram = call(f"{controller}/v1/vram", key=token)
    reserved = {
        replica.get("replica_id")
        for gpu in vram.get("gpus", [])
        for replica in gpu.get("replicas", [])
        if isinstance(replica, dict)
    }
    for model in deployments.get("models", []):
        ready = [r["replica_id"] for r in model.get("replicas", []) if r.get("state") == "ready"]
        missing = sorted(set(ready) - reserved)
        if missing:
            raise SystemExit(f"FAIL allocator: ready replicas of {model['model_id']} hold no reservation: {missing}")
        print(f"ok {model['model_id']}: {len(ready)} ready replicas, each with a VRAM reservation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
