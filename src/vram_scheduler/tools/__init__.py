"""Tools beside the serving path: measure, the demo-model generator, the stress check, the auth Secret."""
