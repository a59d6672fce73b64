"""`ray-vram`: the parser (main.py) and one module per sub-command (commands/)."""
