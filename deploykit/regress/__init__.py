"""Latency and accuracy regression checks against a stored baseline (`deploykit regress`)."""
