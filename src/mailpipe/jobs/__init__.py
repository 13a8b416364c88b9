"""Jobs: each email becomes a job on a durable pipeline, drained by consumers."""
