"""Pure rules: no Ray, no HTTP, no process or file I/O."""
