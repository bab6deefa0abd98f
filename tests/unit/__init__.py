"""Unit tests: pure functions, no processes, no sockets."""
