"""The step loop's pieces: gradient compute, sample splitting, the training entry."""
