"""Step 4: retrieval and ranking models."""
