"""mlsd: the machine learning system design framework as running software."""

__version__ = "0.1.0"
