"""Sizing the prefill and decode pools: the pure decision, the loop that feeds and applies it, replay of traces, and the actuators (Ray Serve, KubeRay)."""
