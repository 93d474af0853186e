"""The prefill pool: a Ray Serve deployment around a vLLM engine that produces KV (next issue)."""
