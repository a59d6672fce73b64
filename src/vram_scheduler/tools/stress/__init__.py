"""`ray-vram check --stress`: a cluster-wide GPU and CPU burn-in.

`report` holds the result models and the verdict rules (pure), `runner` the Ray actors and tasks,
`gpu` the torch/NVML workload that runs on each GPU.
"""
