"""Micro-benchmarks for supd's hot paths; run one with ``python -m benchmarks.<name>``."""
