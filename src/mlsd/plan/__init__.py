"""Step 1: requirements → capacity plan (QPS, storage, replicas, latency budget)."""
