"""The `chaos` command: every role's entry point, the local run, the benches."""
