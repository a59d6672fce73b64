"""The SDK: VRAMScheduler, the inference helpers, transcription. Imports no server module (httpx
only, Ray for a Ray address). Its public names are exported by the package itself:
``from vram_scheduler import VRAMScheduler, inference, inference_batch, ...``.

Inference, split by job: `inference` (one answer), `batch` (many, bounded concurrency),
`streaming` (tokens as they come), `chat_request` (the request body and reading the answer),
`http_calls` (posting with retries), `endpoints` (where a model is served), `arguments` (the
documented argument order, checked without a network call), `inference_errors`.
"""
