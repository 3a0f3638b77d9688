"""Step 5: metrics, offline harness and report, online experiments."""
