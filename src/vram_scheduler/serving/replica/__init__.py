"""One vLLM replica: engine arguments and sizing, GPU pinning and MPS, placement, failures."""
