"""Deep & Cross Network v2 ranker (Wang et al., 2021) in PyTorch, with optional multi-task heads.

Read top to bottom: the config, the network (:class:`CrossLayer`, :class:`DCNv2`), the training
objective and loop, then :class:`DeepRanker`, the ``Ranker`` that fits, scores and saves it.

The network takes *raw* features: numeric columns are standardised inside ``forward`` with the
training mean and std held as buffers, so the exported ONNX graph and the saved state dict need
no preprocessing code beside them. ``forward(dense, sparse) -> (n, n_tasks)`` logits is the
serving interface (see :mod:`mlsd.models.compression`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812 (the universal torch alias)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from mlsd.models.losses import focal_loss
from mlsd.models.ranking.base import (
    PRIMARY_LABEL,
    FeatureSchema,
    FloatArray,
    Ranker,
    RankingData,
    ScoreKind,
    sigmoid,
)
from mlsd.models.threads import torch_threads

RANKER_JSON = "ranker.json"
WEIGHTS_FILE = "model.pt"
EMBEDDING_INIT_STD = 0.05
# Standardised numerics are clipped: one outlier, multiplied by itself through every cross
# layer, would otherwise dominate a batch's gradient.
NUMERIC_CLIP = 5.0
PREDICT_BATCH = 65_536

LossName = Literal["bce", "focal"]
EarlyStopping = Literal["auc", "loss"]
TrainLoss = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(logits (B, n_tasks), targets (B, n_tasks), rows (B,)) -> scalar``; ``rows`` are positions
in the ``train`` data given to ``fit`` (distillation uses them to find the teacher's logits)."""


@dataclass(frozen=True)
class DeepRankerConfig:
    """Hyperparameters of the DCN-v2 network and of its training.

    Attributes:
        embedding_dim: size of every categorical embedding.
        n_cross_layers: explicit feature-crossing layers; ``l`` layers model crosses up to
            degree ``l + 1``.
        mlp_dims: widths of the ReLU layers after the cross layers (``()`` = none).
        dropout: after each MLP layer.
        loss: of the click head, ``"bce"`` or ``"focal"`` (down-weights easy examples).
        focal_gamma: focusing exponent of the focal loss.
        tasks: label name → loss weight. ``"click"`` is required and always head 0; others
            (e.g. ``"rating"`` in [0, 1], NaN = not observed) are extra BCE heads that
            share the network, a regulariser when they correlate with clicks.
        early_stopping: pick the epoch by validation click ``"auc"`` (falls back to the loss
            when a class is missing) or by validation ``"loss"``.
        val_frac: when ``fit`` gets no ``valid``, the last share of train's requests held out
            for early stopping; 0 trains ``max_epochs`` on everything.
        lr: Adam learning rate.
        weight_decay: Adam (L2) weight decay.
        batch_size: rows per gradient step.
        max_epochs: upper bound on passes over the training rows.
        patience: stop after this many epochs without a better validation score.
        seed: seeds torch (init, dropout) and numpy (shuffling); a fit is reproducible on the
            same machine and thread count.
        threads: torch intra-op threads; the ops are small, so one is often fastest.
    """

    embedding_dim: int = 16
    n_cross_layers: int = 3
    mlp_dims: tuple[int, ...] = (256, 128)
    dropout: float = 0.1
    loss: LossName = "bce"
    focal_gamma: float = 2.0
    tasks: Mapping[str, float] = field(default_factory=lambda: {PRIMARY_LABEL: 1.0})
    early_stopping: EarlyStopping = "auc"
    val_frac: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    max_epochs: int = 20
    patience: int = 3
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        # Lists and dicts from TOML or JSON become a tuple and a private dict copy.
        object.__setattr__(self, "mlp_dims", tuple(int(d) for d in self.mlp_dims))
        object.__setattr__(self, "tasks", {str(k): float(v) for k, v in self.tasks.items()})
        counts = (self.embedding_dim, self.batch_size, self.max_epochs, self.patience)
        rules = (
            (min(*counts, self.threads) >= 1,
             "embedding_dim, batch_size, max_epochs, patience, threads >= 1"),
            (self.n_cross_layers >= 0 and all(d >= 1 for d in self.mlp_dims),
             "n_cross_layers >= 0 and mlp_dims >= 1"),
            (self.tasks.get(PRIMARY_LABEL, 0.0) > 0 and min(self.tasks.values()) >= 0,
             f"tasks[{PRIMARY_LABEL!r}] > 0 and other task weights >= 0"),
            (self.loss in ("bce", "focal"), "loss in ('bce', 'focal')"),
            (self.early_stopping in ("auc", "loss"), "early_stopping in ('auc', 'loss')"),
            (0 <= self.dropout < 1 and 0 <= self.val_frac < 1, "dropout and val_frac in [0, 1)"),
            (self.lr > 0 and min(self.weight_decay, self.focal_gamma) >= 0,
             "lr > 0, weight_decay >= 0, focal_gamma >= 0"),
        )  # fmt: skip
        broken = [rule for ok, rule in rules if not ok]
        if broken:
            raise ValueError(f"DeepRankerConfig: need {'; '.join(broken)}; got {self}")

    @property
    def task_names(self) -> tuple[str, ...]:
        """Head order: click first, then the other tasks as configured."""
        return (PRIMARY_LABEL, *(name for name in self.tasks if name != PRIMARY_LABEL))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        raw = dataclasses.asdict(self)
        raw["mlp_dims"], raw["tasks"] = list(self.mlp_dims), dict(self.tasks)
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DeepRankerConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo is not a default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"DeepRankerConfig: unknown fields {unknown}; known: {sorted(names)}")
        return cls(**raw)


class CrossLayer(nn.Module):
    """``x_{l+1} = x0 ⊙ (W x_l + b) + x_l`` with a full-rank ``W``: one more degree of explicit
    feature interaction per layer, and the residual keeps the lower degrees."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        crossed: Tensor = x0 * self.linear(x) + x
        return crossed


@torch.no_grad()
def untrained_codes_to_mean(model: DCNv2, sparse: Tensor) -> None:
    """Give every code absent from the training rows ``sparse`` (code 0, unknown, above all:
    the vocabulary numbers the values it saw from 1) the training rows' mean embedding of its
    column. Such a vector gets no gradient and would stay its random initial one, so a value
    first seen at serving scored by the seed, above most known values in a test; the mean
    vector is the column's average input instead."""
    for column, weight in enumerate(model.embeddings.parameters()):  # one table a column
        counts = torch.bincount(sparse[:, column], minlength=weight.shape[0])
        unseen = counts == 0
        if unseen.any() and not unseen.all():
            weight[unseen] = (counts.to(weight.dtype) / counts.sum()) @ weight


class DCNv2(nn.Module):
    """Raw features → standardise + embed → cross layers → MLP → one logit per task.

    Args:
        config: network sizes (``embedding_dim``, ``n_cross_layers``, ``mlp_dims``, ``dropout``,
            ``tasks``).
        n_numeric: numeric input columns.
        cardinalities: codes of each categorical column (code 0 = unknown has its own vector).
    """

    numeric_mean: Tensor
    numeric_std: Tensor

    def __init__(self, config: DeepRankerConfig, n_numeric: int, cardinalities: Sequence[int]):
        super().__init__()
        self.register_buffer("numeric_mean", torch.zeros(n_numeric))
        self.register_buffer("numeric_std", torch.ones(n_numeric))
        tables = [nn.Embedding(c, config.embedding_dim) for c in cardinalities]
        for table in tables:
            # N(0, 1) embeddings would dwarf the standardised numerics in the products.
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
        self.embeddings = nn.ModuleList(tables)
        dim = n_numeric + len(cardinalities) * config.embedding_dim
        if dim == 0:
            raise ValueError("DCNv2: the schema has no numeric and no categorical columns")
        self.cross = nn.ModuleList(CrossLayer(dim) for _ in range(config.n_cross_layers))
        layers: list[nn.Module] = []
        for width in config.mlp_dims:
            layers += [nn.Linear(dim, width), nn.ReLU(), nn.Dropout(config.dropout)]
            dim = width
        self.mlp = nn.Sequential(*layers)
        self.heads = nn.Linear(dim, len(config.task_names))

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        """``dense`` (n, n_numeric) float32 raw values, ``sparse`` (n, n_categorical) int64
        codes → ``(n, n_tasks)`` logits."""
        numeric = ((dense - self.numeric_mean) / self.numeric_std).clamp(
            -NUMERIC_CLIP, NUMERIC_CLIP
        )
        x0 = torch.cat([numeric, *(t(sparse[:, j]) for j, t in enumerate(self.embeddings))], 1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        logits: Tensor = self.heads(self.mlp(x))
        return logits


def multitask_loss(logits: Tensor, targets: Tensor, config: DeepRankerConfig) -> Tensor:
    """Weighted sum over heads of each head's mean loss over its observed (non-NaN) targets.

    Args:
        logits, targets: ``(B, n_tasks)`` in :attr:`DeepRankerConfig.task_names` order.
    """
    total = logits.new_zeros(())
    for j, name in enumerate(config.task_names):
        observed = ~torch.isnan(targets[:, j])
        y = torch.where(observed, targets[:, j], 0.0)
        if j == 0 and config.loss == "focal":
            loss = focal_loss(logits[:, j], y, gamma=config.focal_gamma, reduction="none")
        else:
            loss = F.binary_cross_entropy_with_logits(logits[:, j], y, reduction="none")
        total = total + config.tasks[name] * (loss * observed).sum() / observed.sum().clamp(min=1)
    return total


def feature_arrays(
    features: pd.DataFrame, schema: FeatureSchema, *, name: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``(n, n_numeric)`` float32 and ``(n, n_categorical)`` int64 raw features, by column name.

    Checked against ``schema`` in a few vectorised ops (this runs per request); only a failing
    check runs the slower ``schema.check``, whose error names the column and row.
    """
    n = len(features)
    if any(c not in features.columns for c in schema.columns):
        schema.check(features, name=name)  # raises, naming the missing columns
    # Column by column: selecting a sub-DataFrame first costs more than the model at batch 500.
    numeric = [features[c].to_numpy() for c in schema.numeric]
    categorical = [features[c].to_numpy() for c in schema.categorical]
    dense = np.stack(numeric, axis=1, dtype=np.float32) if numeric else np.zeros((n, 0), np.float32)
    codes = np.stack(categorical, axis=1) if categorical else np.zeros((n, 0), np.int64)
    limits = np.array([schema.cardinalities[c] for c in schema.categorical], dtype=np.int64)
    valid = (
        all(np.issubdtype(column.dtype, np.integer) for column in categorical)
        and bool(np.isfinite(dense).all())
        and bool(((codes >= 0) & (codes < limits)).all())
    )
    if not valid:
        schema.check(features, name=name)
        raise ValueError(f"{name}: numeric values beyond float32's range (±3.4e38)")
    return dense, codes.astype(np.int64)


def block_arrays(
    matrix: FloatArray, schema: FeatureSchema, *, name: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """:func:`feature_arrays` of a ``schema.matrix`` block (the request path's rows, codes as
    floats): the same arrays without the DataFrame the request path would otherwise build
    for them, which at 500 rows costs about as much as a small network."""
    schema.check_matrix(matrix, name=name)
    k = len(schema.numeric)
    dense = matrix[:, :k].astype(np.float32)
    if not np.isfinite(dense).all():
        raise ValueError(f"{name}: numeric values beyond float32's range (±3.4e38)")
    return dense, matrix[:, k:].astype(np.int64)


class NetworkRanker(Ranker):
    """A ranker whose network reads ``(dense float32, sparse int64)`` arrays and gives one
    logit per head (:class:`DeepRanker` in torch, the ONNX scorer of its export): the
    scoring methods, from a DataFrame or from the request path's block alike."""

    outputs: ScoreKind = "probability"
    schema_: FeatureSchema

    @property
    @abstractmethod
    def task_names(self) -> tuple[str, ...]:
        """Head names in output order; head 0 is the click."""

    @abstractmethod
    def array_logits(
        self, dense: npt.NDArray[np.float32], sparse: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        """``(n, n_tasks)`` float32 logits of :func:`feature_arrays`' arrays."""

    def _ready(self) -> None:
        """Raise if the ranker cannot score yet."""

    def predict_logits(self, features: pd.DataFrame) -> npt.NDArray[np.float32]:
        """``(n, n_tasks)`` float32 logits, heads in :attr:`task_names` order."""
        self._ready()
        name = f"{type(self).__name__}.predict"
        return self.array_logits(*feature_arrays(features, self.schema_, name=name))

    def predict(self, features: pd.DataFrame) -> FloatArray:
        """``(n,)`` float64 click probability."""
        return sigmoid(self.predict_logits(features)[:, 0])

    def predict_tasks(self, features: pd.DataFrame) -> dict[str, FloatArray]:
        """Task name → ``(n,)`` float64 probability of each head (e.g. click, rating)."""
        logits = self.predict_logits(features)
        return {name: sigmoid(logits[:, j]) for j, name in enumerate(self.task_names)}

    def predict_matrix(self, matrix: FloatArray, schema: FeatureSchema) -> FloatArray:
        """:meth:`predict` of a ``schema.matrix`` block, without a DataFrame
        (:func:`block_arrays`) when its columns are the ranker's, in order."""
        self._ready()
        if schema.columns != self.schema_.columns:  # another order: the frame reorders it
            return super().predict_matrix(matrix, schema)
        name = f"{type(self).__name__}.predict"
        logits = self.array_logits(*block_arrays(matrix, self.schema_, name=name))
        return sigmoid(logits[:, 0])


def feature_tensors(
    features: pd.DataFrame, schema: FeatureSchema, *, name: str
) -> tuple[Tensor, Tensor]:
    """:func:`feature_arrays` as torch tensors."""
    dense, sparse = feature_arrays(features, schema, name=name)
    return torch.from_numpy(dense), torch.from_numpy(sparse)


@torch.no_grad()
def batched_logits(model: DCNv2, dense: Tensor, sparse: Tensor) -> Tensor:
    """``(n, n_tasks)`` logits in eval mode, in bounded batches."""
    model.eval()
    parts = [
        model(dense[i : i + PREDICT_BATCH], sparse[i : i + PREDICT_BATCH])
        for i in range(0, len(dense), PREDICT_BATCH)
    ]
    return torch.cat(parts) if parts else dense.new_zeros((0, model.heads.out_features))


@dataclass(frozen=True)
class _Split:
    """Tensors of one data set: raw features and ``(n, n_tasks)`` targets (NaN = unobserved)."""

    dense: Tensor
    sparse: Tensor
    targets: Tensor


def validation_score(model: DCNv2, valid: _Split, config: DeepRankerConfig) -> dict[str, float]:
    """``valid_loss`` and, when both classes are present, the click ``valid_auc``."""
    logits = batched_logits(model, valid.dense, valid.sparse)
    scores = {"valid_loss": float(multitask_loss(logits, valid.targets, config))}
    clicks = valid.targets[:, 0].numpy()
    if 0 < clicks.sum() < len(clicks):
        scores["valid_auc"] = float(roc_auc_score(clicks, logits[:, 0].numpy()))
    return scores


def train_dcn(
    model: DCNv2,
    config: DeepRankerConfig,
    train: _Split,
    train_rows: npt.NDArray[np.int64],
    valid: _Split | None,
    loss_fn: TrainLoss,
    *,
    progress: bool = False,
) -> tuple[list[dict[str, float]], int]:
    """Adam over shuffled mini-batches of ``train_rows``; with ``valid``, stop early and
    restore the best epoch's weights.

    Returns:
        One log entry per epoch, and the epoch whose weights the model ends with.
    """
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    log: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    console = Console(stderr=True)  # stdout stays clean for scripts that print JSON
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    visible = progress and console.is_terminal
    with Progress(*columns, TimeElapsedColumn(), console=console, disable=not visible) as bar:
        task = bar.add_task("DCN-v2", total=config.max_epochs)
        for epoch in range(1, config.max_epochs + 1):
            loss = _train_epoch(
                model, optimizer, train, rng.permutation(train_rows), loss_fn, config.batch_size
            )
            entry = {"epoch": float(epoch), "train_loss": loss}
            if valid is not None:
                entry.update(validation_score(model, valid, config))
                use_auc = config.early_stopping == "auc" and "valid_auc" in entry
                score = entry["valid_auc"] if use_auc else -entry["valid_loss"]
                if best is None or score > best[0]:
                    best = (score, epoch, copy.deepcopy(model.state_dict()))
            log.append(entry)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "epoch")
            bar.update(task, advance=1, description=f"DCN-v2 epoch {epoch}: {shown}")
            if best is not None and epoch - best[1] >= config.patience:
                break
    model.eval()
    if best is None:
        return log, len(log)
    model.load_state_dict(best[2])
    return log, best[1]


def _train_epoch(
    model: DCNv2,
    optimizer: torch.optim.Optimizer,
    train: _Split,
    rows: npt.NDArray[np.int64],
    loss_fn: TrainLoss,
    batch_size: int,
) -> float:
    """One pass over ``rows`` in that order; returns the mean batch loss."""
    model.train()
    losses = []
    for batch in np.array_split(rows, max(1, math.ceil(len(rows) / batch_size))):
        index = torch.from_numpy(batch)
        logits = model(train.dense[index], train.sparse[index])
        loss = loss_fn(logits, train.targets[index], index)
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def _targets(data: RankingData, config: DeepRankerConfig, *, name: str) -> Tensor:
    """``(n, n_tasks)`` float32 labels in head order, checked: click 0/1, others [0, 1] or NaN."""
    columns = []
    for task in config.task_names:
        if task not in data.labels:
            raise ValueError(
                f"{name}: no label {task!r} for DeepRankerConfig.tasks; the data has "
                f"{sorted(data.labels)} (drop the task or add the label)"
            )
        y = np.asarray(data.labels[task], dtype=np.float64)
        seen = y[~np.isnan(y)]
        if task == PRIMARY_LABEL and (len(seen) < len(y) or not np.isin(seen, [0, 1]).all()):
            raise ValueError(f"{name}: the {PRIMARY_LABEL!r} label must be 0/1 without NaN")
        if len(seen) and (seen.min() < 0 or seen.max() > 1):
            raise ValueError(
                f"{name}: label {task!r} spans [{seen.min()}, {seen.max()}]; a BCE head needs "
                "[0, 1] (NaN = unobserved), so rescale it"
            )
        columns.append(y)
    return torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))


def _holdout(data: RankingData, frac: float) -> tuple[npt.NDArray[np.int64], RankingData | None]:
    """Rows of all but the last ``frac`` of the requests, and those last requests (or None)."""
    sizes = data.group_sizes()
    n_valid = math.ceil(frac * len(sizes)) if frac > 0 else 0
    if n_valid == 0 or n_valid >= len(sizes):
        return np.arange(len(data.groups), dtype=np.int64), None
    cut = int(sizes[:-n_valid].sum())
    return np.arange(cut, dtype=np.int64), data.take(np.arange(cut, len(data.groups)))


class DeepRanker(NetworkRanker):
    """Pointwise DCN-v2 ranker; ``predict`` is the click probability.

        ranker = DeepRanker(DeepRankerConfig(tasks={"click": 1.0, "rating": 0.5}))
        ranker.fit(train, valid)
        p_click = ranker.predict(candidates)          # (n,) float64
        heads = ranker.predict_tasks(candidates)      # {"click": (n,), "rating": (n,)}

    Args:
        config: network and training hyperparameters.
        progress: show a progress bar over epochs (on a terminal only, on stderr).

    Attributes:
        schema_: the feature columns it was fitted on.
        model_: the trained :class:`DCNv2` (eval mode; its buffers hold the standardisation).
        training_log_: one dict per epoch: train_loss, valid_loss, valid_auc.
        best_epoch_: the epoch whose weights were kept.
    """

    name = "deep"

    model_: DCNv2
    training_log_: list[dict[str, float]]
    best_epoch_: int

    def __init__(self, config: DeepRankerConfig | None = None, *, progress: bool = True) -> None:
        self.config = config or DeepRankerConfig()
        self.progress = progress

    def fit(
        self,
        train: RankingData,
        valid: RankingData | None = None,
        *,
        loss_fn: TrainLoss | None = None,
    ) -> Self:
        """Train on ``train`` (early stopping on ``valid``, else on train's last requests).

        Args:
            loss_fn: replaces :func:`multitask_loss` as the training objective (validation
                still uses it), e.g. a distillation loss; see :data:`TrainLoss`.
        """
        config, schema = self.config, train.schema
        targets = _targets(train, config, name="DeepRanker.fit train")
        if valid is None:
            rows, valid = _holdout(train, config.val_frac)
        else:
            rows = np.arange(len(train.groups), dtype=np.int64)
        valid_split = None
        if valid is not None:
            dense, sparse = feature_tensors(valid.features, schema, name="DeepRanker.fit valid")
            valid_split = _Split(
                dense, sparse, _targets(valid, config, name="DeepRanker.fit valid")
            )
        split = _Split(*feature_tensors(train.features, schema, name="DeepRanker.fit"), targets)
        with torch_threads(config.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # forked: the caller's torch RNG is left untouched
            cardinalities = [schema.cardinalities[c] for c in schema.categorical]
            model = DCNv2(config, len(schema.numeric), cardinalities)
            numeric = split.dense[torch.from_numpy(rows)].double()
            model.numeric_mean.copy_(numeric.mean(0))
            std = numeric.std(0, correction=0)
            # A constant column carries no signal: leave it unscaled rather than divide by 0.
            model.numeric_std.copy_(torch.where(std > 0, std, 1.0))

            def default_loss(logits: Tensor, y: Tensor, _: Tensor) -> Tensor:
                return multitask_loss(logits, y, config)

            log, best_epoch = train_dcn(
                model, config, split, rows, valid_split, loss_fn or default_loss,
                progress=self.progress,
            )  # fmt: skip
            untrained_codes_to_mean(model, split.sparse[torch.from_numpy(rows)])
        self.schema_, self.model_ = schema, model
        self.training_log_, self.best_epoch_ = log, best_epoch
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("DeepRanker is not fitted; call fit(train) or DeepRanker.load(dir)")

    _ready = _check_fitted

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.config.task_names

    def array_logits(
        self, dense: npt.NDArray[np.float32], sparse: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        self._check_fitted()
        with torch_threads(self.config.threads):
            out = batched_logits(self.model_, torch.from_numpy(dense), torch.from_numpy(sparse))
        logits: npt.NDArray[np.float32] = out.numpy()
        return logits

    def save(self, path: Path) -> None:
        """Write ``ranker.json`` (kind, config, schema, standardisation, log) and ``model.pt``."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.model_.state_dict(), path / WEIGHTS_FILE)
        meta = {
            "kind": self.name,
            "config": self.config.to_dict(),
            "schema": self.schema_.to_dict(),
            "tasks": list(self.config.task_names),
            "numeric_mean": self.model_.numeric_mean.tolist(),
            "numeric_std": self.model_.numeric_std.tolist(),
            "best_epoch": self.best_epoch_,
            "training_log": self.training_log_,
        }
        (path / RANKER_JSON).write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Self:
        """Inverse of :meth:`save`; the weights load with ``weights_only=True`` (no pickle)."""
        meta_path = Path(path) / RANKER_JSON
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a directory written by save")
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != cls.name:
            raise ValueError(f"{meta_path}: kind {meta.get('kind')!r} is not {cls.name!r}")
        ranker = cls(DeepRankerConfig.from_dict(meta["config"]), progress=False)
        schema = FeatureSchema.from_dict(meta["schema"])
        cardinalities = [schema.cardinalities[c] for c in schema.categorical]
        model = DCNv2(ranker.config, len(schema.numeric), cardinalities)
        state = torch.load(Path(path) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        ranker.schema_, ranker.model_ = schema, model.eval()
        ranker.training_log_, ranker.best_epoch_ = meta["training_log"], meta["best_epoch"]
        return ranker
