"""mlsd: the machine learning system design framework as running software.

Importing the package first keeps the process's Prometheus metric values in memory. Feast's
import (``feast.metrics``, for its feature server, which the project does not run) makes a
temp folder and points ``PROMETHEUS_MULTIPROC_DIR`` at it, which switches ``prometheus_client``
to file-backed multiprocess values for every metric created afterwards, the service's own
``/metrics`` included (1.8 µs more per counter and histogram update here). So
``prometheus_client.values`` is imported here, before any Feast import; a child mlsd process
first drops the variables it inherited from a parent's Feast (a ``feast_metrics_*`` folder), or
its values would be file-backed. The service removes Feast's folder when it stops
(:func:`remove_feast_metrics_dir`): Feast removes it only at a normal exit, which a signal skips.
"""

import os
import sys
from pathlib import Path
from typing import Final

FEAST_METRICS_PREFIX: Final = "feast_metrics_"
"""What Feast names its temp folder (``tempfile.mkdtemp(prefix=...)`` in ``feast.metrics``)."""

for _name in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"):
    if Path(os.environ.get(_name, "")).name.startswith(FEAST_METRICS_PREFIX):
        del os.environ[_name]  # a parent's Feast set it: not this process's choice

import prometheus_client.values  # noqa: E402, F401  (in-memory metric values, before Feast)

__version__ = "0.1.0"

HELP_MARKUP: Final = "markdown"
"""How the CLI renders help text: as Markdown, in Rich's panels. Rich markup (Typer's default)
takes config references such as ``[retrieval].test_frac`` for style tags and drops them."""


def remove_feast_metrics_dir() -> None:
    """Remove the temp folder Feast's import made in this process, as Feast does at a normal
    exit (its own cleanup, which checks the folder is this process's); nothing when Feast was
    not imported."""
    metrics = sys.modules.get("feast.metrics")
    cleanup = getattr(metrics, "_cleanup_multiprocess_dir", None)
    if callable(cleanup):
        cleanup()
