"""Ranking: rankers that order a few hundred candidates by predicted engagement."""
