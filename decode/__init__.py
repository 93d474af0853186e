"""The decode pool: a Ray Serve deployment around a vLLM engine that consumes KV (next issue)."""
