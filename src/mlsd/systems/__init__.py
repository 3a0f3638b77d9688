"""Case studies, each a thin composition of the parts."""
