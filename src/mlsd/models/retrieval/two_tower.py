"""Two-tower retrieval model: a user tower, an item tower and their training objective.

The user tower reads what is known at request time: the user's static attributes, the ids of
the last ``history_len`` items they interacted with (pooled by a mean or by attention) and the
request context (hour of day, day of week). The item tower reads the item id, its category and
its popularity so far. Both end in an L2-normalised ``dim`` vector, so a (user, item) score is
a cosine and the item vectors go straight into an inner-product index.

Three pieces, as in torchrec's two-tower example: :class:`TwoTower` (the encoders),
:class:`InBatchSoftmax` (the training objective) and, in ``two_tower_train.py``,
``TwoTowerRetriever`` (data preparation, the training loop and the serving wrapper).

Input tensors use *item tokens*: catalog position + 1, with 0 as the padding of histories.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 (the universal torch alias)
from torch import Tensor, nn

Pooling = Literal["mean", "attention"]

N_HOURS = 24
N_WEEKDAYS = 7
EMBEDDING_INIT_STD = 0.05
MIN_LEARNED_TEMPERATURE = 0.01
"""A learned temperature is clamped to [this, 1] (a fixed one is used as configured)."""


@dataclass(frozen=True)
class TwoTowerConfig:
    """Hyperparameters of the two-tower model and of its training.

    Attributes:
        dim: size of the user and item vectors (and of every embedding table).
        history_len: the user tower reads the last ``history_len`` items before the request.
        pooling: ``"mean"`` of the history item embeddings, or ``"attention"`` (a query from
            the user's attributes and context attends over the items plus recency positions).
        temperature: softmax temperature of the cosine scores (the initial value if learned).
        learn_temperature: learn the temperature (clamped to [0.01, 1], so its initial value
            must be >= 0.01) instead of fixing it. A fixed temperature is used as given.
        logq_correction: subtract the log of each candidate's sampling probability from its
            logit (Yi et al., 2019), so popular items are not over-penalised as negatives.
        logq_window_events: a batch is a run of consecutive events, so an item's chance to be
            in it is its share of the ``logq_window_events`` events before the batch (counted
            in events, not days, so that sparse and busy datasets get alike estimates).
        n_random_negatives: extra negatives per batch, uniform over the catalog, shared by all
            rows (mixed negative sampling; they also push down never-clicked items).
        history_gap_hours: in training, an example's history stops this long before its time.
            Recommendations made at a cutoff serve requests hours to weeks later; with no gap
            the model learns the order a user clicks through in one sitting instead (on
            MovieLens, the order of the rating UI), which does not carry over.
        popularity_windows_days: besides all-time counts, the item tower reads the item's
            events in each of these windows before the time it is embedded at.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: training events per batch (each row's positive is a negative for the rest).
        max_epochs: upper bound on passes over the training events.
        patience: stop after this many epochs without a better validation recall@100.
        val_frac: the last share of the training window's events (by time) held out to pick
            the epoch; 0 trains ``max_epochs`` on everything.
        refit: after early stopping, retrain from scratch on the whole window for the best
            number of epochs. Off by default: it doubles the fit time and, trained on ML-100K's
            first 90% and scored on the next 10%, made no difference (3 seeds); the held-out
            tail still feeds the histories and popularity features of the fitted model.
        user_features: ``users`` columns used as categorical attributes; ``None`` takes every
            non-id column with at most ``max_feature_levels`` distinct values.
        max_feature_levels: the bound of the automatic choice (skips e.g. zip codes).
        seed: seeds torch and numpy, so a fit is reproducible on the same machine and threads.
        threads: torch intra-op threads. The model's ops are small: on 2 shared cores one
            thread was 5× faster than two, which spin-wait on each other under load.
    """

    dim: int = 64
    history_len: int = 50
    pooling: Pooling = "mean"
    temperature: float = 0.05
    learn_temperature: bool = False
    logq_correction: bool = True
    logq_window_events: int = 10_000
    n_random_negatives: int = 0
    history_gap_hours: float = 24.0
    popularity_windows_days: tuple[float, ...] = (7.0, 30.0, 182.0)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    max_epochs: int = 20
    patience: int = 3
    val_frac: float = 0.1
    refit: bool = False
    user_features: tuple[str, ...] | None = None
    max_feature_levels: int = 100
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        # Lists (from TOML or JSON) become tuples, so configs compare equal and hash.
        object.__setattr__(self, "popularity_windows_days", tuple(self.popularity_windows_days))
        if self.user_features is not None:
            object.__setattr__(self, "user_features", tuple(self.user_features))
        positive = ("dim", "history_len", "batch_size", "max_epochs", "patience", "threads",
                    "logq_window_events")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TwoTowerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.pooling not in ("mean", "attention"):
            raise ValueError(
                f"TwoTowerConfig.pooling must be 'mean' or 'attention', got {self.pooling!r}"
            )
        if not 0.0 < self.temperature <= 1.0:
            raise ValueError(
                f"TwoTowerConfig.temperature must be in (0, 1], got {self.temperature}"
            )
        if self.learn_temperature and self.temperature < MIN_LEARNED_TEMPERATURE:
            # The clamp would hold it at the bound, where the clamp's gradient is 0: it could
            # never move.
            raise ValueError(
                f"TwoTowerConfig.temperature={self.temperature}: with learn_temperature, the "
                f"initial temperature must be >= {MIN_LEARNED_TEMPERATURE} (a learned "
                "temperature is clamped to [0.01, 1]); raise it, or fix it "
                "(learn_temperature=False) to train at a lower one"
            )
        if not 0.0 <= self.val_frac < 1.0:
            raise ValueError(f"TwoTowerConfig.val_frac must be in [0, 1), got {self.val_frac}")
        non_negative = ("n_random_negatives", "weight_decay", "history_gap_hours")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"TwoTowerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if min(self.lr, *self.popularity_windows_days) <= 0:
            raise ValueError(
                "TwoTowerConfig: lr and popularity_windows_days must be > 0, "
                f"got {self.lr}, {self.popularity_windows_days}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        raw = dataclasses.asdict(self)
        raw["popularity_windows_days"] = list(self.popularity_windows_days)
        if self.user_features is not None:
            raw["user_features"] = list(self.user_features)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TwoTowerConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo is not a default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"TwoTowerConfig: unknown fields {unknown}; known: {sorted(names)}")
        return cls(**raw)


@dataclass(frozen=True)
class FeatureSizes:
    """Vocabulary sizes the towers are built for (known only after seeing the data)."""

    n_items: int
    n_categories: int
    attribute_levels: tuple[int, ...]
    """Distinct values of each user attribute; code 0 is reserved for unknown."""


class UserFeatures(NamedTuple):
    """One batch of user-tower inputs (B rows)."""

    history: Tensor
    """``(B, history_len)`` int64 item tokens, oldest first, right-aligned, 0 = padding."""
    attributes: Tensor
    """``(B, n_attributes)`` int64 codes, 0 = unknown."""
    hour: Tensor
    """``(B,)`` int64 hour of day 0-23 of the request, -1 = unknown (the mean embedding)."""
    weekday: Tensor
    """``(B,)`` int64 day of week 0-6 (Monday = 0), -1 = unknown."""


class ItemFeatures(NamedTuple):
    """One batch of item-tower inputs (C items)."""

    item: Tensor
    """``(C,)`` int64 item tokens (catalog position + 1)."""
    category: Tensor
    """``(C,)`` int64 category codes, 0 = none."""
    popularity: Tensor
    """``(C, 2 + n_windows)`` float32 popularity as of some time, ``/ 10``: log1p of the events
    so far, of the events in each of ``popularity_windows_days``, and the first minus log1p of
    the mean item's events so far."""


def _embed_or_mean(table: nn.Embedding, codes: Tensor) -> Tensor:
    """Embedding of each code; code -1 (unknown) gets the mean of the table, the marginal."""
    out = table(codes.clamp(min=0))
    return torch.where((codes < 0)[:, None], table.weight.mean(0), out)


class AttentionPooling(nn.Module):
    """Attention over the history: a query from the user's side features scores each item."""

    def __init__(self, dim: int, history_len: int, side_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(side_dim, dim)
        # Right-aligned histories: column j is always the (history_len - j)-th most recent item.
        self.recency = nn.Parameter(torch.zeros(history_len, dim))
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, items: Tensor, mask: Tensor, side: Tensor) -> Tensor:
        """``items`` (B, N, d), ``mask`` (B, N) bool real items, ``side`` (B, s) → (B, d)."""
        query = self.query(side)
        logits = torch.einsum("bnd,bd->bn", items + self.recency, query) * self.scale
        # A finite fill, not -inf: an empty history then spreads its weight over padding
        # (zero vectors) and pools to zeros, with no NaN in the forward or backward pass.
        weights = torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=1)
        return torch.einsum("bn,bnd->bd", weights, items * mask[..., None])


class UserTower(nn.Module):
    """Attributes + pooled history + context → an L2-normalised ``dim`` vector."""

    def __init__(self, config: TwoTowerConfig, sizes: FeatureSizes) -> None:
        super().__init__()
        d = config.dim
        self.history_len = config.history_len
        # An EmbeddingBag's "mean" skips the padding and never builds the (B, N, d) tensor.
        self.history_items = nn.EmbeddingBag(sizes.n_items + 1, d, mode="mean", padding_idx=0)
        self.attributes = nn.ModuleList(nn.Embedding(n + 1, d) for n in sizes.attribute_levels)
        self.hour = nn.Embedding(N_HOURS, d)
        self.weekday = nn.Embedding(N_WEEKDAYS, d)
        side_dim = d * (len(sizes.attribute_levels) + 2)
        self.attention = (
            AttentionPooling(d, config.history_len, side_dim)
            if config.pooling == "attention"
            else None
        )
        # + 1: log of the history length, so "no history yet" is visible to the MLP.
        self.mlp = nn.Sequential(nn.Linear(side_dim + d + 1, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, features: UserFeatures) -> Tensor:
        """``(B, dim)`` user vectors of unit length."""
        side = torch.cat(
            [table(features.attributes[:, i]) for i, table in enumerate(self.attributes)]
            + [
                _embed_or_mean(self.hour, features.hour),
                _embed_or_mean(self.weekday, features.weekday),
            ],
            dim=1,
        )
        mask = features.history > 0
        if self.attention is None:
            pooled = self.history_items(features.history)
        else:
            items = F.embedding(features.history, self.history_items.weight, padding_idx=0)
            pooled = self.attention(items, mask, side)
        length = torch.log1p(mask.sum(1, keepdim=True).float()) / math.log1p(self.history_len)
        return F.normalize(self.mlp(torch.cat([pooled, side, length], dim=1)), dim=1)


class ItemTower(nn.Module):
    """Item id + category + popularity → an L2-normalised ``dim`` vector."""

    def __init__(self, config: TwoTowerConfig, sizes: FeatureSizes) -> None:
        super().__init__()
        d = config.dim
        self.items = nn.Embedding(sizes.n_items + 1, d, padding_idx=0)
        self.categories = nn.Embedding(sizes.n_categories + 1, d)
        self.popularity = nn.Linear(2 + len(config.popularity_windows_days), d)
        self.mlp = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, features: ItemFeatures) -> Tensor:
        """``(C, dim)`` item vectors of unit length."""
        x = torch.cat(
            [
                self.items(features.item),
                self.categories(features.category),
                self.popularity(features.popularity),
            ],
            dim=1,
        )
        return F.normalize(self.mlp(x), dim=1)


class TwoTower(nn.Module):
    """The two encoders; ``user_tower`` runs per request, ``item_tower`` once per catalog."""

    def __init__(self, config: TwoTowerConfig, sizes: FeatureSizes) -> None:
        super().__init__()
        self.user_tower = UserTower(config, sizes)
        self.item_tower = ItemTower(config, sizes)
        # torch's N(0, 1) embeddings would drown the few dense features (popularity) at the
        # start; small ones let every input matter until the data says otherwise.
        for module in self.modules():
            if isinstance(module, nn.Embedding | nn.EmbeddingBag):
                nn.init.normal_(module.weight, std=EMBEDDING_INIT_STD)
                if module.padding_idx is not None:
                    nn.init.zeros_(module.weight[module.padding_idx])


def sampled_softmax_loss(
    scores: Tensor,
    candidates: Tensor,
    *,
    temperature: Tensor | float,
    log_q: Tensor | None = None,
    row_users: Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy of each row's positive against the other sampled candidates.

    Args:
        scores: ``(B, C)`` user · candidate scores; column ``i < B`` is row ``i``'s positive,
            the other columns (the other rows' positives, then random items) its negatives.
        candidates: ``(C,)`` item token of each column. A column holding the same item as a
            row's positive is an accidental hit, not a negative, and is masked out of that row.
        temperature: the scores are divided by it.
        log_q: ``(C,)`` log of each candidate's expected count in a batch's sample. Subtracting
            it makes the sampled softmax an unbiased estimate of the full softmax, so the
            scores learn log p(item | user) rather than that minus log popularity.
        row_users: ``(B,)`` user of each row; another positive of the same user in the batch
            is not a negative for that user either, and is masked the same way.

    Returns:
        The mean loss over rows (a scalar).
    """
    n_rows = scores.shape[0]
    logits = scores / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    rows = torch.arange(n_rows, device=scores.device)
    hits = candidates[None, :] == candidates[:n_rows, None]
    if row_users is not None:
        hits[:, :n_rows] |= row_users[None, :] == row_users[:, None]
    hits[rows, rows] = False
    return F.cross_entropy(logits.masked_fill(hits, -torch.inf), rows)


class InBatchSoftmax(nn.Module):
    """The training objective: in-batch (+ random) negatives, log-Q correction, temperature."""

    log_temperature: Tensor
    learned: bool

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        initial = torch.tensor(math.log(config.temperature))
        self.learned = config.learn_temperature
        if config.learn_temperature:
            self.log_temperature = nn.Parameter(initial)
        else:
            self.register_buffer("log_temperature", initial)

    @property
    def temperature(self) -> Tensor:
        """The softmax temperature: a learned one clamped to [0.01, 1], a fixed one as set."""
        temperature = self.log_temperature.exp()
        return temperature.clamp(MIN_LEARNED_TEMPERATURE, 1.0) if self.learned else temperature

    def forward(
        self,
        model: TwoTower,
        users: UserFeatures,
        candidates: ItemFeatures,
        log_q: Tensor | None,
        row_users: Tensor | None = None,
    ) -> Tensor:
        """Loss of a batch: ``users`` has B rows, ``candidates`` their B positives + extras."""
        user_vectors = model.user_tower(users)
        item_vectors = model.item_tower(candidates)
        scores = user_vectors @ item_vectors.T
        return sampled_softmax_loss(
            scores, candidates.item, temperature=self.temperature, log_q=log_q, row_users=row_users
        )
