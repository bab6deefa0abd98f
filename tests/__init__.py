"""Chaos test suite."""
