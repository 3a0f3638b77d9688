"""Step 7: drift, live metrics, alerts."""
