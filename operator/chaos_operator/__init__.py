"""Chaos control plane: the ChaosJob/ChaosPeer API, the pure reconcile, and the kopf operator
around it (`main.run_operator`), with its federation between parties."""
