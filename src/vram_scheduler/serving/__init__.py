"""Serving: vLLM replicas on Ray Serve inside their VRAM reservations, one OpenAI endpoint in front.

Modules: `sizing` (engine budget from bytes), `pinning` (GPU pinning), `placement` (node of a
replica), `engine_args` (vLLM flags), `replica` (the Serve deployment owning vLLM), `router`
(the OpenAI endpoint), `app` (Serve application builders), `controller` (converges the cluster
to a config), `http_api` (the controller's HTTP API), `local` (`ray-vram up`).
"""
