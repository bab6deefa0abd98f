"""Chaos control plane: API models, reconcile logic, the kopf operator and the `chaos` CLI."""
