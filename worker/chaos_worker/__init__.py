"""Chaos data plane: training loop, collective, membership, replication and monitoring."""
