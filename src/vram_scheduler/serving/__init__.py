"""Serving: vLLM replicas on Ray Serve inside their VRAM reservations, one OpenAI endpoint in front.

`controller/` converges the cluster to a config (its actor, HTTP API and guard), `router/` is the
OpenAI endpoint, `replica/` the Serve deployment owning vLLM (sizing, pinning, MPS, placement,
engine flags), `app` builds Serve applications, `options` their deployment options,
`endpoint_board` tells routers where replicas listen, `internal_key` what replicas require of them.
"""
