"""The personalized feed: the flagship system, composed from the parts."""
