"""Step 3b: feature definitions, point-in-time computation, feature store."""
