"""The model registry: register a bundle directory, gate promotions, roll back, download verified.

MLflow holds all of it: embedded, a SQLite file plus a local artifact folder; in production, a
tracking server URI. A bundle is registered with ``MlflowClient.log_artifacts`` and
``MlflowClient.create_model_version(source=<run artifact uri>/model)``, not with
``mlflow.pyfunc.log_model``. Serving loads a bundle with our own code from safe formats (JSON,
LightGBM text, ``torch.load(weights_only=True)``, ONNX, ``.npy``), so a pyfunc wrapper would only
add a pickled or models-from-code ``python_model``, an inferred environment (a CUDA torch) and
an ``MLmodel`` file nobody reads. Stored layout of one version (its ``source``)::

    model/
      bundle/...          the directory given to register(), byte for byte
      requirements.txt    pinned serving packages
      manifest.json       {"files": {relative path: sha256}} of every other file above

Where the state lives:

* the version tags ``mlsd.gate_metric``, ``mlsd.gate_value`` and ``mlsd.manifest_sha256`` (so
  promotion needs no run, and a rewritten ``manifest.json`` is caught too); the stored gate
  value is the version's score on its own validation window, so :meth:`ModelRegistry.promote`
  also takes a :class:`HeadToHead` (both models scored on the same data), which retraining
  uses: after the data moved, stored values from different windows do not compare;
* the version tags ``dataset_hash`` and ``mlsd.protocol.<setting>`` (the evaluation settings
  that shape the stored value, written by ``mlsd feed train``): without a head-to-head,
  promote() refuses a candidate whose tags differ from the champion's;
* the alias ``champion`` on the registered model (moved by promote() and rollback()), and
  any other alias, e.g. an experiment's ``challenger`` (moved by set_alias());
* the registered-model tag ``mlsd.champion_history``: JSON list of earlier champions, oldest
  first; promote() pushes the outgoing champion, rollback() pops it.

MLflow rejects ``@`` in metric and param names, so ``ndcg@10`` is logged on the run as
``ndcg_at_10``; the version tags keep the original name. Read-modify-write of the history tag is
not atomic: run one promotion at a time per model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

MODEL_PATH = "model"
BUNDLE_PATH = "bundle"
MANIFEST = "manifest.json"
REQUIREMENTS = "requirements.txt"
SERVING_PACKAGES = ("mlsd", "numpy", "torch", "lightgbm", "onnxruntime")
GATE_METRIC_TAG = "mlsd.gate_metric"
GATE_VALUE_TAG = "mlsd.gate_value"
MANIFEST_TAG = "mlsd.manifest_sha256"
HEAD_TO_HEAD_TAG = "mlsd.head_to_head"
"""Version tag: JSON of the head-to-head its promotion was gated on (see :class:`HeadToHead`)."""
DATASET_TAG = "dataset_hash"
"""Version tag: the content hash of the dataset the version was trained and scored on."""
PROTOCOL_TAG_PREFIX = "mlsd.protocol."
"""Version tags ``mlsd.protocol.<setting>``: the evaluation settings that shape the stored gate
value (e.g. ``ranker_windows``, ``ranker_valid_frac``); see :meth:`ModelRegistry.promote`."""
HISTORY_TAG = "mlsd.champion_history"
MAX_HISTORY = 50
_REMOTE_SCHEMES = ("http://", "https://", "databricks")
NOLOAD_WARNING = r"The ``noload`` loader strategy is deprecated"
"""The start of the SQLAlchemy deprecation MLflow's SQL store triggers at import (see
:func:`quiet_mlflow_warnings`)."""


class RegistryNotFoundError(ValueError):
    """No registry where the tracking URI points (its SQLite file or store folder is missing);
    ``path`` names it. Reading commands raise it instead of creating an empty registry."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"no model registry at {path}; pass --base-dir with the folder `make demo` or "
            "`mlsd feed train --register` used (make demo: --base-dir demo-output), or "
            "--registry-uri"
        )
        self.path = path


class CorruptArtifactError(ValueError):
    """A downloaded model does not match its manifest; ``path`` names the first bad file."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


@dataclasses.dataclass(frozen=True)
class RegistryConfig:
    """Where the registry lives and how promotion is gated (relative paths: against base_dir)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    model_name: str = "mlsd-feed"
    experiment: str = "mlsd-feed"
    gate_metric: str = "ndcg@10"
    gate_tolerance: float = 0.005
    champion_alias: str = "champion"


@dataclasses.dataclass(frozen=True)
class HeadToHead:
    """The gate metric of a candidate and of the champion measured on the same data.

    The stored value of a version is its score on the validation window of *its own* training
    data, so two stored values compare two windows; after the data moved (a drift), the
    champion's describes a world that is gone. A head-to-head scores both models on one window
    (e.g. the candidate's, the newest) and lets the gate compare like with like.

    Attributes:
        champion_version: the champion that was scored; promotion refuses a head-to-head made
            against another champion (the alias moved meanwhile).
        candidate_value, champion_value: the gate metric of each on ``data``.
        data: what both were scored on, for the reason line (e.g. "held-out users of
            [2024-01-28, 2024-01-31)").
    """

    champion_version: int
    candidate_value: float
    champion_value: float
    data: str


@dataclasses.dataclass(frozen=True)
class Promotion:
    """The outcome of :meth:`ModelRegistry.promote`; ``forced`` means force overrode a refusal.

    ``head_to_head`` says whether the values were measured on the same data (a
    :class:`HeadToHead`) or are the versions' stored values, each on its own window.
    """

    version: int
    accepted: bool
    forced: bool
    reason: str
    metric: str
    candidate_value: float
    champion_value: float | None
    previous_champion: int | None
    head_to_head: bool = False


@dataclasses.dataclass(frozen=True)
class VersionInfo:
    """One registered version; ``created`` is UTC; ``head_to_head`` the comparison its
    promotion was gated on (:class:`HeadToHead` fields + ``metric``, ``tolerance``,
    ``accepted``), when it was gated on one."""

    version: int
    gate_metric: str | None
    gate_value: float | None
    aliases: tuple[str, ...]
    created: datetime
    head_to_head: Mapping[str, Any] | None = None


class ModelRegistry:
    """Register, gate, promote, roll back and download model bundles in MLflow."""

    def __init__(self, config: RegistryConfig | None = None, base_dir: Path = Path()) -> None:
        self.config = config or RegistryConfig()
        self.base_dir = Path(base_dir).resolve()
        self.tracking_uri = _resolve_tracking_uri(self.config.tracking_uri, self.base_dir)

    @property
    def local_store(self) -> Path | None:
        """The SQLite file (or store folder) of a local tracking URI; None for a server's."""
        uri = self.tracking_uri
        if uri.startswith("sqlite:///"):
            path = uri[len("sqlite:///") :].split("?", 1)[0]
            return None if path in ("", ":memory:") else Path(path)
        if uri.startswith("file://"):
            return Path(uri[len("file://") :])
        if "://" not in uri and not uri.startswith("databricks"):
            return Path(uri)  # a plain path: MLflow's file store, as MLflow resolves it
        return None

    def exists(self) -> bool:
        """Whether the registry is there to read: a local store whose file exists, or a server
        (not asked: the first call tells)."""
        store = self.local_store
        return store is None or store.exists()

    def require_existing(self) -> ModelRegistry:
        """This registry, after checking that it exists (opening a missing local store would
        create an empty one).

        Raises:
            RegistryNotFoundError: the local store is missing.
        """
        if not self.exists():
            assert self.local_store is not None
            raise RegistryNotFoundError(self.local_store)
        return self

    @cached_property
    def _client(self) -> MlflowClient:
        _quiet_mlflow()
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def register(
        self,
        bundle_dir: Path,
        *,
        params: Mapping[str, object],
        metrics: Mapping[str, float],
        tags: Mapping[str, str] | None = None,
    ) -> int:
        """Log ``bundle_dir`` in one run with params, metrics and a manifest; return its version."""
        bundle_dir = Path(bundle_dir)
        files = _check_bundle(bundle_dir)
        gate = self.config.gate_metric
        if gate not in metrics or not math.isfinite(float(metrics[gate])):
            raise ValueError(
                f"metrics must hold a finite {gate!r} (the promotion gate); got {dict(metrics)}"
            )
        from mlflow.entities import Metric, Param, RunTag

        client, tags = self._client, {_key(k): v for k, v in (tags or {}).items()}
        run = client.create_run(self._experiment_id(), tags=tags, run_name=bundle_dir.name)
        run_id, now = run.info.run_id, int(time.time() * 1000)
        try:
            client.log_batch(
                run_id,
                metrics=[Metric(_key(k), float(v), now, 0) for k, v in metrics.items()],
                params=[Param(_key(k), str(v)) for k, v in params.items()],
                tags=[RunTag(GATE_METRIC_TAG, gate)],
            )
            manifest_sha = self._log_model_dir(run_id, bundle_dir, files)
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id)
        self._ensure_model()
        version_tags = {
            **tags,
            GATE_METRIC_TAG: gate,
            GATE_VALUE_TAG: repr(float(metrics[gate])),
            MANIFEST_TAG: manifest_sha,
        }
        mv = client.create_model_version(
            self.config.model_name,
            source=f"{run.info.artifact_uri}/{MODEL_PATH}",
            run_id=run_id,
            tags=version_tags,
        )
        return int(mv.version)

    def promote(
        self, version: int, *, force: bool = False, head_to_head: HeadToHead | None = None
    ) -> Promotion:
        """Point the champion alias at ``version`` if it passes the gate (or ``force``).

        The gate: the candidate's gate metric is no worse than the champion's minus
        ``gate_tolerance``. With ``head_to_head``, the values compared are both models' on the
        same data (what ``mlsd feed retrain`` measures); without, the versions' stored values,
        each measured on its own training data's validation window — comparable only while
        the data has not moved (``mlsd feed promote`` without a dataset). So without a
        head-to-head the gate refuses when the two versions record different ``dataset_hash``
        tags or different ``mlsd.protocol.*`` settings (a tag recorded on one version only is
        not compared); ``force`` promotes anyway and the result says it was forced.

        Raises:
            ValueError: ``head_to_head`` scored another version than the current champion.
        """
        metric, tolerance = self.config.gate_metric, self.config.gate_tolerance
        current = self.champion()
        compared = head_to_head is not None and current not in (None, version)
        champion_value: float | None
        if head_to_head is not None and compared:
            if head_to_head.champion_version != current:
                raise ValueError(
                    f"the head-to-head scored v{head_to_head.champion_version}, but the "
                    f"champion is now v{current}; measure it again against v{current}"
                )
            candidate, champion_value = head_to_head.candidate_value, head_to_head.champion_value
        else:
            candidate = self._gate_value(version)
            champion_value = None if current is None else self._gate_value(current)
        mismatch: str | None = None
        if not compared and current is not None and current != version:
            mismatch = self._incomparable(version, current)
        if current is None:
            accepted, why = True, "no champion yet"
        elif current == version:
            accepted, why = True, f"version {version} is already the champion"
        elif mismatch is not None:
            accepted = False
            why = (
                f"the stored {metric} values do not compare: {mismatch}; score both on the "
                "same data with `mlsd feed retrain` (head to head)"
            )
        else:
            assert champion_value is not None
            # The epsilon keeps a candidate exactly at the tolerance from failing on rounding.
            accepted = candidate >= champion_value - tolerance - 1e-12
            basis = (
                f"head to head on {head_to_head.data}"
                if head_to_head is not None and compared
                else "stored values, each on its own validation window"
            )
            why = (
                f"{metric} {candidate:.4f} vs champion v{current} {champion_value:.4f}, "
                f"tolerance {tolerance:g}; {basis}"
            )
        forced = force and not accepted
        if head_to_head is not None and compared:
            record = {**dataclasses.asdict(head_to_head), "metric": metric,
                      "tolerance": tolerance, "accepted": accepted}  # fmt: skip
            self._client.set_model_version_tag(
                self.config.model_name, str(version), HEAD_TO_HEAD_TAG, json.dumps(record)
            )
        if accepted or forced:
            if current is not None and current != version:
                self._set_history([*self._history(), current])
            self._client.set_registered_model_alias(
                self.config.model_name, self.config.champion_alias, str(version)
            )
        return Promotion(
            version=version,
            accepted=accepted or forced,
            forced=forced,
            reason=why,
            metric=metric,
            candidate_value=candidate,
            champion_value=champion_value,
            previous_champion=current,
            head_to_head=compared,
        )

    def rollback(self) -> int:
        """Move the champion alias back to the previous champion and return its version."""
        history, current = self._history(), self.champion()
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise ValueError(
                f"model {self.config.model_name!r} has no previous champion to roll back to "
                f"(current: {current}); promote a version instead"
            )
        previous = history.pop()
        self._client.set_registered_model_alias(
            self.config.model_name, self.config.champion_alias, str(previous)
        )
        self._set_history(history)
        return previous

    def set_alias(self, alias: str, version: int) -> None:
        """Point ``alias`` (e.g. ``challenger``, an experiment arm) at ``version``.

        Not the champion alias: :meth:`promote` moves it, through the gate and the history
        :meth:`rollback` uses.

        Raises:
            ValueError: ``alias`` is the champion alias, is empty or a version-like number,
                or ``version`` is not registered.
        """
        if alias == self.config.champion_alias:
            raise ValueError(
                f"the {alias!r} alias moves only through the gate: "
                f"mlsd feed promote --version {version}"
            )
        if not alias or alias.isdigit() or alias.strip() != alias:
            raise ValueError(f"alias {alias!r}: use a name such as 'challenger'")
        self._model_version(version)  # the version exists (else a ValueError naming it)
        self._client.set_registered_model_alias(self.config.model_name, alias, str(version))

    def champion(self) -> int | None:
        """The version holding the champion alias, or None."""
        return self.alias_version(self.config.champion_alias)

    def alias_version(self, alias: str) -> int | None:
        """The version holding ``alias``, or None."""
        model = self._registered_model()
        if model is None or alias not in model.aliases:
            return None
        return int(model.aliases[alias])

    def versions(self) -> list[VersionInfo]:
        """Every registered version, oldest first."""
        model = self._registered_model()
        if model is None:
            return []
        aliases: dict[int, list[str]] = {}
        for alias, version in model.aliases.items():
            aliases.setdefault(int(version), []).append(alias)
        # search_model_versions may leave aliases empty, hence the registered model's map above.
        name = self.config.model_name.replace("'", "\\'")
        found: list[ModelVersion] = []
        page = self._client.search_model_versions(f"name = '{name}'")
        while True:
            found.extend(page)
            if not page.token:
                break
            page = self._client.search_model_versions(f"name = '{name}'", page_token=page.token)
        infos = [
            VersionInfo(
                version=int(mv.version),
                gate_metric=mv.tags.get(GATE_METRIC_TAG),
                gate_value=float(mv.tags[GATE_VALUE_TAG]) if GATE_VALUE_TAG in mv.tags else None,
                aliases=tuple(sorted(aliases.get(int(mv.version), []))),
                created=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC),
                head_to_head=(
                    json.loads(mv.tags[HEAD_TO_HEAD_TAG]) if HEAD_TO_HEAD_TAG in mv.tags else None
                ),
            )
            for mv in found
        ]
        return sorted(infos, key=lambda info: info.version)

    def download(self, version_or_alias: int | str, dest: Path) -> Path:
        """Fetch a version (number or alias) into the empty ``dest``, verify it, return its bundle.

        Files land in ``dest/model/`` (``bundle/``, ``requirements.txt``, ``manifest.json``);
        the returned path is ``dest/model/bundle``.

        Raises:
            CorruptArtifactError: a file is missing, extra or differs from the manifest.
        """
        mv = self._model_version(version_or_alias)
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise ValueError(f"download destination {dest} is not empty; pass a new directory")
        from mlflow.artifacts import download_artifacts

        # The version's source, not ``models:/name/version``: in mlflow 3.17.2 a models:/ URI
        # is resolved against the global registry URI (default ./mlflow.db), ignoring ours.
        local = download_artifacts(
            artifact_uri=mv.source, dst_path=str(dest), tracking_uri=self.tracking_uri
        )
        return verify_model_dir(Path(local), manifest_sha256=mv.tags.get(MANIFEST_TAG))

    def _log_model_dir(self, run_id: str, bundle_dir: Path, files: dict[str, str]) -> str:
        """Log ``model/`` (bundle, requirements.txt, manifest.json); return the manifest sha256."""
        self._client.log_artifacts(run_id, str(bundle_dir), f"{MODEL_PATH}/{BUNDLE_PATH}")
        with tempfile.TemporaryDirectory() as tmp:
            staging = Path(tmp)
            (staging / REQUIREMENTS).write_text(_requirements())
            manifest = {f"{BUNDLE_PATH}/{rel}": sha for rel, sha in files.items()}
            manifest[REQUIREMENTS] = _sha256(staging / REQUIREMENTS)
            raw = json.dumps({"format": 1, "files": manifest}, indent=2, sort_keys=True)
            (staging / MANIFEST).write_text(raw + "\n")
            self._client.log_artifacts(run_id, tmp, MODEL_PATH)
            return _sha256(staging / MANIFEST)

    def _experiment_id(self) -> str:
        experiment = self._client.get_experiment_by_name(self.config.experiment)
        if experiment is not None:
            return str(experiment.experiment_id)
        location = _resolve_artifact_location(
            self.config.artifact_location, self.tracking_uri, self.base_dir
        )
        return self._client.create_experiment(self.config.experiment, artifact_location=location)

    def _ensure_model(self) -> None:
        if self._registered_model() is None:
            self._client.create_registered_model(self.config.model_name)

    def _registered_model(self) -> RegisteredModel | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_registered_model(self.config.model_name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _model_version(self, version_or_alias: int | str) -> ModelVersion:
        from mlflow.exceptions import MlflowException

        name, ref = self.config.model_name, str(version_or_alias)
        try:
            if ref.isdigit():
                return self._client.get_model_version(name, ref)
            return self._client.get_model_version_by_alias(name, ref)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise ValueError(
                    f"model {name!r} has no version or alias {ref!r} in {self.tracking_uri}; "
                    "see `mlsd feed versions`"
                ) from exc
            raise

    def _gate_value(self, version: int) -> float:
        tags = self._model_version(version).tags
        if tags.get(GATE_METRIC_TAG) != self.config.gate_metric or GATE_VALUE_TAG not in tags:
            raise ValueError(
                f"version {version} of {self.config.model_name!r} records the gate metric "
                f"{tags.get(GATE_METRIC_TAG)!r}, not {self.config.gate_metric!r}; "
                "register it again or change gate_metric"
            )
        return float(tags[GATE_VALUE_TAG])

    def _incomparable(self, candidate: int, champion: int) -> str | None:
        """Why the stored gate values of two versions do not compare, or None if they do.

        They do not when the versions record different datasets (``dataset_hash``) or
        different evaluation settings (``mlsd.protocol.*``); only tags both record count, but a
        version that records no evaluation settings at all (registered before they were
        recorded, when the stored value was computed differently) does not compare with one
        that does.
        """
        ours, theirs = self._model_version(candidate).tags, self._model_version(champion).tags
        settings = [_has_protocol_tags(tags) for tags in (ours, theirs)]
        if settings[0] != settings[1]:
            older = champion if settings[0] else candidate
            return (
                f"v{older} records no evaluation settings (mlsd.protocol.* tags): it was "
                "registered by an older mlsd, whose stored value was computed differently"
            )
        keys = [DATASET_TAG, *sorted(k for k in ours if k.startswith(PROTOCOL_TAG_PREFIX))]
        differ = [k for k in keys if k in ours and k in theirs and ours[k] != theirs[k]]
        if not differ:
            return None
        parts = []
        for key in differ:
            name = "dataset_hash" if key == DATASET_TAG else key[len(PROTOCOL_TAG_PREFIX) :]
            parts.append(f"{name} {ours[key]} (v{candidate}) vs {theirs[key]} (v{champion})")
        what = "trained on different datasets" if DATASET_TAG in differ else "scored differently"
        return f"{what}: " + ", ".join(parts)

    def _history(self) -> list[int]:
        model = self._registered_model()
        raw = None if model is None else model.tags.get(HISTORY_TAG)
        return [int(v) for v in json.loads(raw)] if raw else []

    def _set_history(self, history: list[int]) -> None:
        self._client.set_registered_model_tag(
            self.config.model_name, HISTORY_TAG, json.dumps(history[-MAX_HISTORY:])
        )


def _has_protocol_tags(tags: Mapping[str, str]) -> bool:
    return any(key.startswith(PROTOCOL_TAG_PREFIX) for key in tags)


def verify_model_dir(model_dir: Path, *, manifest_sha256: str | None = None) -> Path:
    """Check every file of a downloaded model against ``manifest.json``; return its bundle dir.

    Args:
        model_dir: the folder :meth:`ModelRegistry.download` filled.
        manifest_sha256: the digest recorded on the model version, if known.

    Raises:
        CorruptArtifactError: naming the first missing, extra or changed file.
    """
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        raise CorruptArtifactError(f"{manifest_path} is missing; the model is incomplete", MANIFEST)
    if manifest_sha256 is not None and _sha256(manifest_path) != manifest_sha256:
        raise CorruptArtifactError(
            f"{manifest_path} differs from the digest recorded on the model version", MANIFEST
        )
    try:
        expected: dict[str, str] = dict(json.loads(manifest_path.read_text())["files"])
    except (ValueError, KeyError, TypeError) as exc:
        message = f"{manifest_path} is not a valid manifest: {exc}"
        raise CorruptArtifactError(message, MANIFEST) from exc
    actual = {rel: sha for rel, sha in _hash_tree(model_dir).items() if rel != MANIFEST}
    problems = [(rel, "missing") for rel in sorted(expected.keys() - actual.keys())]
    problems += [(rel, "not in the manifest") for rel in sorted(actual.keys() - expected.keys())]
    problems += [
        (rel, "sha256 mismatch")
        for rel in sorted(expected.keys() & actual.keys())
        if expected[rel] != actual[rel]
    ]
    if problems:
        listed = ", ".join(f"{rel} ({what})" for rel, what in problems)
        raise CorruptArtifactError(f"corrupt model in {model_dir}: {listed}", problems[0][0])
    return model_dir / BUNDLE_PATH


def _check_bundle(bundle_dir: Path) -> dict[str, str]:
    if not bundle_dir.exists():
        raise ValueError(f"bundle directory {bundle_dir} does not exist; train a model first")
    if not bundle_dir.is_dir():
        raise ValueError(f"bundle {bundle_dir} is not a directory; pass the bundle folder")
    files = _hash_tree(bundle_dir)
    if not files:
        raise ValueError(f"bundle directory {bundle_dir} holds no files")
    return files


def _hash_tree(root: Path) -> dict[str, str]:
    """Relative POSIX path → sha256 hex of every file under ``root``."""
    return {
        path.relative_to(root).as_posix(): _sha256(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _key(name: str) -> str:
    """An MLflow-safe metric/param name: ``ndcg@10`` → ``ndcg_at_10``."""
    name = name.replace("@", "_at_")
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)


def _requirements() -> str:
    lines = []
    for package in SERVING_PACKAGES:
        try:
            # Drop local versions (``2.13.0+cpu``): pip resolves them only on special indexes.
            lines.append(f"{package}=={metadata.version(package).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def _resolve_tracking_uri(uri: str, base_dir: Path) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str((base_dir / uri[len(prefix) :]).resolve())
    return uri


def _resolve_artifact_location(location: str, tracking_uri: str, base_dir: Path) -> str | None:
    """A URI as is; a path against ``base_dir``, unless a server owns the artifacts."""
    if "://" in location or location.startswith("mlflow-artifacts:"):
        return location
    if tracking_uri.startswith(_REMOTE_SCHEMES):
        return None  # the tracking server's own (proxied) artifact root
    return (base_dir / location).resolve().as_uri()


def quiet_mlflow_warnings() -> None:
    """Hide the ``SADeprecationWarning`` about ``noload`` that MLflow's SQL store module
    triggers when it is imported: MLflow's to fix, nothing a user can act on. Only that warning
    (a ``DeprecationWarning`` subclass, matched by message) and only from ``mlflow.store``.

    The CLI calls this when it starts, and :class:`ModelRegistry` again just before MLflow is
    used: importing Feast puts a filter showing every ``DeprecationWarning`` in front of the
    others, and calling this again moves this one back before it."""
    warnings.filterwarnings(
        "ignore", message=NOLOAD_WARNING, category=DeprecationWarning, module=r"mlflow\.store\."
    )


def _quiet_mlflow() -> None:
    """Keep MLflow's INFO logs, progress bars, telemetry and its known deprecation warning out
    of the CLI's output."""
    quiet_mlflow_warnings()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow  # noqa: F401  (configures its loggers on import; we override below)

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
