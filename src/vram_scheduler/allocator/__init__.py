"""The Ray actor that owns the VRAM ledger, its store in the GCS and its group commit."""
