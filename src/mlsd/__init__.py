"""mlsd: the machine learning system design framework as running software.

Importing the package first settles what Feast's import (``feast.metrics``) would otherwise
decide for every mlsd process:

- Feast points ``PROMETHEUS_MULTIPROC_DIR`` at a temp folder for its feature server's
  metrics, which switches ``prometheus_client`` to file-backed multiprocess values for every
  metric the process creates afterwards, the service's own ``/metrics`` included (1.8 µs more
  per counter and histogram update here). Importing ``prometheus_client.values`` first keeps
  this process's values in memory; the project does not run Feast's feature server.
- Feast makes that folder with ``mkdtemp`` on every import and removes it only at a normal
  exit, so each service stopped by a signal left one behind. Naming it first (one folder per
  user, ``mlsd-prometheus-<uid>`` in the temp folder, which stays empty) stops that.
- Child processes inherit the variables: an mlsd child drops the ones that name that folder
  before it imports ``prometheus_client``, so its metrics stay in memory too.
"""

import os
import tempfile
from pathlib import Path
from typing import Final

_FEAST_METRICS_DIR = Path(tempfile.gettempdir()) / f"mlsd-prometheus-{os.getuid()}"
for _name in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"):
    if os.environ.get(_name) == str(_FEAST_METRICS_DIR):  # a parent mlsd process set it
        del os.environ[_name]

import prometheus_client.values  # noqa: E402, F401  (in-memory metric values, before Feast)

if "PROMETHEUS_MULTIPROCESS_DIR" not in os.environ:
    _FEAST_METRICS_DIR.mkdir(mode=0o700, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROCESS_DIR"] = str(_FEAST_METRICS_DIR)

__version__ = "0.1.0"

HELP_MARKUP: Final = "markdown"
"""How the CLI renders help text: as Markdown, in Rich's panels. Rich markup (Typer's default)
takes config references such as ``[retrieval].test_frac`` for style tags and drops them."""
