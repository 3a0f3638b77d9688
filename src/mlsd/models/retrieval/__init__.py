"""Candidate generation: retrievers that narrow the catalog to a few hundred candidates."""
