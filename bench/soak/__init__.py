"""Soak benchmark: steady load on `ray-vram up` while a model is added and removed by values
changes (`python -m bench.soak`, see run.py)."""
