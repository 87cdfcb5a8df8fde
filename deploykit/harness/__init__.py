"""Latency and fidelity measurement."""
