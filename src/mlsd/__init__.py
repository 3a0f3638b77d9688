"""mlsd: the machine learning system design framework as running software."""

from typing import Final

__version__ = "0.1.0"

HELP_MARKUP: Final = "markdown"
"""How the CLI renders help text: as Markdown, in Rich's panels. Rich markup (Typer's default)
takes config references such as ``[retrieval].test_frac`` for style tags and drops them."""
