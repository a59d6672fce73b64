"""The allocator under a burst: reserve and release rates against the ledger's size (single calls
and batches, several client processes on local Ray), the whole-ledger write the allocator used to
make on every change at each size, and a kill of the allocator in the middle of a burst (how long
until it answers again, and whether any reservation was lost or doubled).

Run ``python -m bench.allocator`` (see ``__main__`` for options); it prints a table and writes
``bench/results/allocator.json``.
"""
