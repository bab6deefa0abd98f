"""Who is in the job: the view, its next-view rules, readiness, the protocol."""
