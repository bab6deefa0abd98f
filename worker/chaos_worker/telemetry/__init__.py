"""What a worker measures and exports: link table, probes, stall, Prometheus."""
