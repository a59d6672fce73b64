"""The SDK: what a program needs to call the models a ray-vram cluster serves, with httpx only
(nothing here imports Ray, vLLM or a server module). Its public names are exported by the
package itself: ``from vram_scheduler import inference, inference_batch, ...``.

Inference, split by job: `inference` (one answer), `batch` (many, bounded concurrency),
`streaming` (tokens as they come), `chat_request` (the request body and reading the answer),
`http_calls` (posting with retries), `endpoints` (where a model is served), `arguments` (the
documented argument order, checked without a network call), `inference_errors`.
"""
