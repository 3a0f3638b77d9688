"""Step 6: ANN index, request pipeline, FastAPI app, batch prediction, registry."""
