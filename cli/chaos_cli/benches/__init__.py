"""Benchmarks behind `chaos bench`; each prints JSON, none asserts on time."""
