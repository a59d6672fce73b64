"""Packing quality: how many replicas each placement method gets onto generated heterogeneous
clusters without overcommitting a GPU, against the exact optimum of an integer program.

Run ``python -m bench.packing`` (see ``__main__`` for options); it prints a table and writes
``bench/results/packing.json``.
"""
