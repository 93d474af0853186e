"""MoE expert buffering inside vLLM: a few expert slots per layer in device memory, every
expert in host memory, and the test MoE checkpoint the project generates."""
