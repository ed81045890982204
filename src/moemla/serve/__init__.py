"""moemla serve: an OpenAI-compatible HTTP server over a batching decoder."""
