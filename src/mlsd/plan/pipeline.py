"""Which pipeline a plan's CPU costs were measured on, and whether it is the one planned for.

``bench/serving.py`` measures one system, its ``CONFIG`` (``configs/feed-demo.toml``: three
candidate sources), while ``mlsd plan capacity`` plans for ``--config`` (``configs/feed.toml``
by default: seven sources). A request's CPU and latency grow with the sources it merges and
the ranker it runs, so one pipeline's costs applied to another plan a different system. The
bench writes :meth:`Pipeline.of_config` of the config it ran into its JSON (``pipeline``), and
:func:`pipeline_warnings` compares it with the planned config's: the plan warns when they
differ, or when a run from before the record cannot tell.

Two hashes: ``config_sha256`` of the file's bytes (the exact file measured), and
``settings_sha256`` of the config as read, ``[plan]`` apart, so a plan whose config differs
from the measured one only in ``[plan]`` (the traffic it plans for) or in comments is the
measured pipeline. Both come from this module on both sides, so they agree by construction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsd.config import DEFAULT_FEED_CONFIG, load_feed_config

BUILT_IN = "built-in defaults"
""":attr:`Pipeline.config` when no config file was read (:func:`mlsd.config.load_feed_config`
without a path, and no ``configs/feed.toml`` in the working directory)."""


@dataclass(frozen=True)
class Pipeline:
    """A feed system's request path as its config sets it.

    Attributes:
        config: the config file, as given (or :data:`BUILT_IN`).
        config_sha256: SHA-256 of the file's bytes (``None``: the built-in defaults).
        settings_sha256: SHA-256 of the config as read, every section but ``[plan]``.
        sources: ``[retrieval].sources``, in merge order.
        ranker: ``[ranking].ranker`` as configured (``auto``: chosen when training).
        served_ranker: the ranker the measured model serves (its ``model.json``; ``None``: not
            recorded, and always for a planned config, which has no model yet).
    """

    config: str
    config_sha256: str | None
    settings_sha256: str
    sources: tuple[str, ...]
    ranker: str
    served_ranker: str | None = None

    @classmethod
    def of_config(cls, path: Path | None = None) -> Pipeline:
        """The pipeline of a feed config, read as :func:`~mlsd.config.load_feed_config` reads
        it (``None``: ``configs/feed.toml`` in the working directory if there, else the
        built-in defaults)."""
        if path is None and DEFAULT_FEED_CONFIG.is_file():
            path = DEFAULT_FEED_CONFIG
        feed = load_feed_config(path)
        settings = {k: v for k, v in dataclasses.asdict(feed).items() if k != "plan"}
        text = json.dumps(settings, sort_keys=True)
        return cls(
            config=str(path) if path is not None else BUILT_IN,
            config_sha256=hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None,
            settings_sha256=hashlib.sha256(text.encode()).hexdigest(),
            sources=tuple(feed.retrieval.sources),
            ranker=feed.ranking.ranker,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``bench/serving.py``'s ``pipeline``)."""
        return dataclasses.asdict(self) | {"sources": list(self.sources)}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Pipeline:
        """Read :meth:`to_dict`'s fields; a missing or malformed one is an error naming
        ``where`` and the key."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: pipeline should be an object, got {raw!r}")

        def text(key: str, *, optional: bool = False) -> str | None:
            value = raw.get(key)
            if value is None and optional:
                return None
            if not isinstance(value, str):
                raise ValueError(f"{where}: pipeline.{key} should be a string, got {value!r}")
            return value

        sources = raw.get("sources")
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise ValueError(
                f"{where}: pipeline.sources should be a list of source names, got {sources!r}"
            )
        return cls(
            config=str(text("config")),
            config_sha256=text("config_sha256", optional=True),
            settings_sha256=str(text("settings_sha256")),
            sources=tuple(sources),
            ranker=str(text("ranker")),
            served_ranker=text("served_ranker", optional=True),
        )

    def describe(self) -> str:
        """``configs/x.toml (sources a, b; ranker r)`` for a warning."""
        ranker = self.ranker
        if self.served_ranker is not None and self.served_ranker != self.ranker:
            ranker += f", served {self.served_ranker}"
        return f"{self.config} (sources {', '.join(self.sources)}; ranker {ranker})"


def pipeline_warnings(
    measured: Pipeline | None,
    planned: Pipeline | None,
    source: str,
    *,
    unbuildable: Sequence[str] = (),
) -> list[str]:
    """What the plan should say about applying ``measured``'s costs to ``planned``.

    Nothing when they are the same file, or the same settings but for ``[plan]``; the sources
    each has that the other lacks and the rankers when those differ; else that other settings
    differ. ``source``: where the measured costs come from (the JSON file). ``unbuildable``:
    the planned config's sources that cannot be built at the planned catalog (EASE above its
    ``max_items``), which a bench run of that config would fail on.
    """
    if measured is None:
        planned_text = f" than {planned.describe()}" if planned is not None else ""
        return [
            f"{source} does not record which pipeline it measured (a bench/serving.py run "
            "from before it did): its CPU costs and p99 may be of another pipeline"
            f"{planned_text}, with other sources and ranker; re-run bench/serving.py, which "
            "records its config, sources and ranker"
        ]
    if planned is None or measured.settings_sha256 == planned.settings_sha256:
        return []
    if measured.config_sha256 is not None and measured.config_sha256 == planned.config_sha256:
        return []
    bench = f"re-run bench/serving.py --config {planned.config}"
    if unbuildable:
        bench += (
            f" once {', '.join(unbuildable)} is out of its [retrieval].sources (it cannot be "
            "built at this catalog: see its warning)"
        )
    redo = f"{bench}, or plan for the measured pipeline with --config {measured.config}"

    only_measured = _missing(measured.sources, planned.sources)
    only_planned = _missing(planned.sources, measured.sources)
    if only_measured or only_planned or measured.ranker != planned.ranker:
        differences = []
        if only_planned:
            differences.append(f"sources not measured: {', '.join(only_planned)}")
        if only_measured:
            differences.append(f"sources measured but not planned: {', '.join(only_measured)}")
        if measured.ranker != planned.ranker:
            differences.append(f"ranker {measured.ranker} measured, {planned.ranker} planned")
        return [
            f"CPU costs and p99 were measured on {measured.describe()}, not on the planned "
            f"{planned.describe()}: {'; '.join(differences)}. A request's CPU and latency grow "
            f"with its sources and ranker, so cores, replicas and the latency budget are of "
            f"another system: {redo}"
        ]
    return [
        f"CPU costs and p99 were measured on {measured.config}, whose settings outside [plan] "
        f"differ from the planned {planned.config}'s (the same sources and ranker; e.g. a "
        f"source's dimensions or the candidates ranked may cost differently): {redo}"
    ]


def _missing(names: Sequence[str], others: Sequence[str]) -> list[str]:
    return [name for name in names if name not in others]
