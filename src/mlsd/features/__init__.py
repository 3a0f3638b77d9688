"""Step 3b: feature definitions, point-in-time computation, feature store.

Every Feast import of the project is under this package, so its import runs first and settles
two things Feast's own import (``feast.metrics``) would otherwise decide for the process:

- Feast points ``PROMETHEUS_MULTIPROC_DIR`` at a temp folder for its feature server's
  metrics, which switches ``prometheus_client`` to file-backed multiprocess values for every
  metric the process creates afterwards, the service's own ``/metrics`` included (1.8 µs more
  per counter and histogram update here). Importing ``prometheus_client.values`` first keeps
  this process's values in memory; the project does not run Feast's feature server.
- Feast makes that folder with ``mkdtemp`` on every import and removes it only at a normal
  exit, so each service stopped by a signal left one behind in the temp folder. Naming the
  folder first (one shared, empty folder, ``mlsd-prometheus`` in the temp folder) stops that.
"""

import os
import tempfile
from pathlib import Path

import prometheus_client.values  # noqa: F401  (fixes in-memory metric values before Feast)

if "PROMETHEUS_MULTIPROCESS_DIR" not in os.environ:
    _SHARED = Path(tempfile.gettempdir()) / "mlsd-prometheus"
    _SHARED.mkdir(exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROCESS_DIR"] = str(_SHARED)
