"""The ingress's client APIs: OpenAI-compatible HTTP with its request models, and gRPC."""
