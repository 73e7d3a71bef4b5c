"""paysaga's exactly-once stream processing engine (knows nothing of payments)."""
