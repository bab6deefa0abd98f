"""Training state between members: snapshots, the replicator, the puller."""
