"""KV-cache transfer over gRPC and the vLLM connector built on it."""
