"""The OpenAI router: request bounds, media checks, routing to replicas, its metrics."""
