"""An A/B experiment's traffic in the service log: one row per randomisation unit and arm.

:func:`read_units` reads the log written by :mod:`mlsd.monitoring.logs`
(``<log_dir>/<table>/date=YYYY-MM-DD/*.parquet``, tables ``requests``, ``exposures`` and
``feedback``) with DuckDB, through the views of :func:`mlsd.monitoring.log_reader.create_log_views`:
its clicks are the log's click attribution (a ``click`` with the exposure's request id and item,
or, without a request id, on the latest exposure of that item to that user at most
``attribution_window_s`` before the click). The statistics over these units are
:mod:`mlsd.evaluation.experiment_stats`'s; the report, :mod:`mlsd.evaluation.experiments`'s.
"""

from __future__ import annotations

import os
from datetime import datetime

import pandas as pd

from mlsd.monitoring.log_reader import (
    ATTRIBUTED,
    DEFAULT_ATTRIBUTION_WINDOW_S,
    connect,
    create_log_views,
)

__all__ = ["EmptyLogError", "read_units"]


class EmptyLogError(ValueError):
    """The log holds no traffic of the experiment in the window."""


# The unit of a request is its user, or the request itself for an anonymous (negative) user; a
# request counts for its experiment when either its requests row or its exposures say so.
_UNITS_SQL = f"""
WITH req AS (
    SELECT request_id, user_id, arm FROM requests WHERE experiment = $experiment
    UNION
    SELECT request_id, user_id, arm FROM exposures WHERE experiment = $experiment
),
per_request AS (
    SELECT request_id, arm, count(*) AS exposures, count(*) FILTER (clicked) AS clicks
    FROM {ATTRIBUTED}
    WHERE experiment = $experiment
    GROUP BY request_id, arm
)
SELECT r.user_id, CASE WHEN r.user_id >= 0 THEN '' ELSE r.request_id END AS anonymous_request,
       r.arm, count(DISTINCT r.request_id) AS requests,
       coalesce(sum(p.exposures), 0)::BIGINT AS exposures,
       coalesce(sum(p.clicks), 0)::BIGINT AS clicks
FROM req r LEFT JOIN per_request p USING (request_id, arm)
GROUP BY ALL
"""


def read_units(
    log_dir: str | os.PathLike[str],
    experiment_name: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    attribution_window_s: float = DEFAULT_ATTRIBUTION_WINDOW_S,
) -> pd.DataFrame:
    """One row per (unit, logged arm) of an experiment's requests in ``[start, end)``.

    Clicks count up to ``attribution_window_s`` after ``end``.

    Returns:
        columns ``user_id`` (-1 anonymous), ``anonymous_request`` (the request id that is the
        unit of an anonymous user, else ""), ``arm``, ``requests``, ``exposures``, ``clicks``.
    """
    with connect() as con:
        create_log_views(con, log_dir, start, end, attribution_window_s=attribution_window_s)
        return con.execute(_UNITS_SQL, {"experiment": experiment_name}).df()
