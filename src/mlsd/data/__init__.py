"""Step 3a: the dataset contract, loaders, validation + quarantine, temporal split, sampling."""
