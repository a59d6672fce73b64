"""Stack (c) of the benchmark: Ray Serve LLM's unmodified OpenAI app (`build_openai_app`) serving
the demo model on vLLM's CPU backend; stays up until SIGINT/SIGTERM.

Usage: python bench/serving/serve_llm.py --model DIR --port 18002
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

import ray
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app

from .stacks import ENGINE

PASS = ("VLLM_", "HF_", "TRANSFORMERS_", "TORCH", "TMPDIR", "XDG_CACHE_HOME", "RAY_AUTH_MODE", "DO_NOT_TRACK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    env = {k: v for k, v in os.environ.items() if k.startswith(PASS)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    config = LLMConfig(
        model_loading_config={"model_id": "demo", "model_source": args.model},
        accelerator_config={"kind": "cpu"},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        engine_kwargs=dict(ENGINE),
        runtime_env={"env_vars": env},
    )
    # On 2 CPUs the ingress must not ask for a CPU of its own, or it never schedules.
    app = build_openai_app(
        {"llm_configs": [config], "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}}
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(app, name="llm", blocking=False)
    while not stop.wait(0.5):
        pass
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
