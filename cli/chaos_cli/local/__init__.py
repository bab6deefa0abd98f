"""The cluster simulated on one machine behind `chaos run`."""
