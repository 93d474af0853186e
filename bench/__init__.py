"""Benchmarks: KV transfer, load generation, goodput."""
