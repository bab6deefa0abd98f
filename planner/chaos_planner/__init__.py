"""Chaos planner: pure functions for shard plans, aggregation trees and switch steps.

No torch, no network, no files, no clocks: every function here is deterministic.
"""
