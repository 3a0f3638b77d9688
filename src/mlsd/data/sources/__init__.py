"""Loaders that write the dataset contract: MovieLens, generic CSV, the simulated world."""
