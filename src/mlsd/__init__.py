"""mlsd: the machine learning system design framework as running software.

Importing the package first keeps the process's Prometheus metric values in memory. Feast's
import (``feast.metrics``, for its feature server, which the project does not run) makes a
temp folder and points ``PROMETHEUS_MULTIPROC_DIR`` at it, which switches ``prometheus_client``
to file-backed multiprocess values for every metric created afterwards, the service's own
``/metrics`` included (1.8 µs more per counter and histogram update here). So
``prometheus_client.values`` is imported here, before any Feast import; a child mlsd process
first drops the variables it inherited from a parent's Feast (a ``feast_metrics_*`` folder), or
its values would be file-backed. The modules that import Feast remove its folder, and the
variables naming it, as soon as it is made (:func:`remove_feast_metrics_dir`): Feast removes it
only at a normal exit, so every process a signal ended (a service stopped with SIGTERM, a push
child killed for stalling) left an empty folder in the temp directory.
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
    """Remove the temp folder Feast's import made in this process, through Feast's own cleanup
    (which checks the folder is this process's), and the variables naming it, so that a child
    process which is not mlsd (Feast's CLI) makes its own instead of writing into a folder that
    is gone; nothing when Feast was not imported or the folder is not this process's."""
    metrics = sys.modules.get("feast.metrics")
    cleanup = getattr(metrics, "_cleanup_multiprocess_dir", None)
    folder = getattr(metrics, "_prometheus_mp_dir", None)
    made_here = getattr(metrics, "_owns_mp_dir", False) and (
        getattr(metrics, "_owner_pid", None) == os.getpid()
    )
    if not (callable(cleanup) and folder and made_here):
        return  # no Feast, or a folder someone else named: theirs to keep
    cleanup()
    for name in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"):
        if os.environ.get(name) == folder:
            del os.environ[name]
