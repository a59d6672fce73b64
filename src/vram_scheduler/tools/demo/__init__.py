"""Generated demo models (random weights, trained tokenizers) for tests, CI and the tutorial."""
