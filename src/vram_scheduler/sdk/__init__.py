"""The SDK: VRAMScheduler, the inference helpers, transcription. Imports no server module."""
