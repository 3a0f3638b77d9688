"""Sampling and class imbalance: negatives for implicit feedback, downsampling, weights, SMOTE.

Implicit feedback only records positives (a click, a watch); a model that scores items needs
negatives too. :func:`sample_negatives` draws them from the catalog, uniformly or by
popularity, never hitting an item the user interacted with in the same window.

Clicks are rare (often < 1%), so training sets are dominated by negatives. Keeping each
negative with probability ``w`` (:func:`downsample_negatives`) cuts training cost by ~1/w
with little loss, but a model trained on the downsampled data over-predicts; its outputs are
mapped back with :func:`recalibrate_downsampled` (He et al. 2014, "Practical Lessons from
Predicting Clicks on Ads at Facebook", section 6.2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

Seed = int | np.random.Generator | None
NegativeStrategy = Literal["uniform", "popularity"]
ClassWeightKind = Literal["balanced", "balanced_sqrt", "uniform"]


# --- negative sampling -------------------------------------------------------------------


def _item_probabilities(
    catalog: npt.NDArray[np.int64],
    pos_item_idx: npt.NDArray[np.intp],
    strategy: NegativeStrategy,
    alpha: float,
    item_counts: npt.ArrayLike | None,
) -> npt.NDArray[np.float64]:
    """Sampling probability of each catalog item, shape (n_items,), summing to 1."""
    if strategy == "uniform":
        return np.full(catalog.size, 1.0 / catalog.size)
    if strategy != "popularity":
        raise ValueError(f"strategy must be 'uniform' or 'popularity', got {strategy!r}")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if item_counts is None:
        counts = np.bincount(pos_item_idx, minlength=catalog.size).astype(np.float64)
    else:
        counts = np.asarray(item_counts, dtype=np.float64)
        if counts.shape != catalog.shape or not np.all(np.isfinite(counts)) or counts.min() < 0:
            raise ValueError(
                f"item_counts must be {catalog.size} finite non-negative counts aligned with "
                f"catalog, got shape {counts.shape}"
            )
    # 0 ** alpha is 0 for alpha > 0: items nobody interacted with are never drawn.
    weights = np.where(counts > 0, counts**alpha, 0.0)
    if weights.sum() <= 0:
        raise ValueError("popularity sampling needs at least one item with a positive count")
    probs: npt.NDArray[np.float64] = weights / weights.sum()
    return probs


def _check_catalog(catalog: npt.ArrayLike) -> npt.NDArray[np.int64]:
    items = np.asarray(catalog)
    if items.ndim != 1 or items.size == 0 or not np.issubdtype(items.dtype, np.integer):
        raise ValueError("catalog must be a non-empty 1-D array of integer item ids")
    if np.unique(items).size != items.size:
        raise ValueError("catalog has duplicate item ids; pass each item once")
    return items.astype(np.int64)


def sample_negative_items(
    user_ids: npt.ArrayLike,
    item_ids: npt.ArrayLike,
    catalog: npt.ArrayLike,
    *,
    n_negatives: int = 4,
    strategy: NegativeStrategy = "uniform",
    alpha: float = 0.75,
    item_counts: npt.ArrayLike | None = None,
    seed: Seed = None,
    max_rounds: int = 1000,
) -> npt.NDArray[np.int64]:
    """Draw ``n_negatives`` catalog items per positive, none of them a positive of that user.

    Items are drawn with replacement from ``p`` (uniform, or ``p ∝ count ** alpha`` for
    ``strategy="popularity"``: alpha = 0.75 as in word2vec, 1 is raw popularity, 0 is uniform
    over the items with a count; items with count 0 are never drawn), restricted to items the
    user has no positive for in ``(user_ids, item_ids)``. Sampling is vectorised rejection:
    draw everything, find collisions with the user's positives via int64 ``(user, item)``
    keys, redraw only the collisions.

    Args:
        user_ids: (n_pos,) user id of each positive.
        item_ids: (n_pos,) item id of each positive; every id must be in ``catalog``.
        catalog: (n_items,) distinct item ids that may be drawn.
        n_negatives: negatives per positive.
        strategy: ``"uniform"`` or ``"popularity"``.
        alpha: popularity exponent (``strategy="popularity"`` only).
        item_counts: (n_items,) popularity counts aligned with ``catalog``; by default the
            number of positives of each item in ``item_ids``.
        seed: seed or generator; the same seed gives the same negatives.
        max_rounds: bound on redraw rounds (reached only when a user's positives cover
            nearly all the probability mass).

    Returns:
        (n_pos, n_negatives) item ids; row i holds the negatives drawn for positive i.
    """
    if isinstance(n_negatives, bool) or not isinstance(n_negatives, int) or n_negatives < 1:
        raise ValueError(f"n_negatives must be a positive integer, got {n_negatives!r}")
    users = np.asarray(user_ids)
    items = np.asarray(item_ids)
    if users.ndim != 1 or users.shape != items.shape:
        raise ValueError(
            f"user_ids and item_ids must be 1-D of the same length, got {users.shape} "
            f"and {items.shape}"
        )
    catalog_arr = _check_catalog(catalog)
    order = np.argsort(catalog_arr)
    pos = np.searchsorted(catalog_arr, items, sorter=order).clip(max=catalog_arr.size - 1)
    item_idx = order[pos]
    unknown = catalog_arr[item_idx] != items
    if unknown.any():
        raise ValueError(
            f"{int(unknown.sum())} positives have item ids missing from the catalog, e.g. "
            f"{np.unique(items[unknown])[:5].tolist()}; pass the full item catalog"
        )
    n_items = catalog_arr.size
    user_idx, user_uniques = pd.factorize(users)  # hash-based: faster than np.unique here
    if user_uniques.size > np.iinfo(np.int64).max // n_items:
        raise ValueError("too many users x items to key (user, item) pairs in int64")
    probs = _item_probabilities(catalog_arr, item_idx, strategy, alpha, item_counts)
    pos_keys = np.sort(user_idx.astype(np.int64) * n_items + item_idx)
    pos_keys = pos_keys[np.r_[True, pos_keys[1:] != pos_keys[:-1]]]
    _check_users_have_room(pos_keys, n_items, probs, user_uniques)

    rng = np.random.default_rng(seed)
    owner = np.repeat(user_idx.astype(np.int64), n_negatives)
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]  # the last drawable item gets exactly 1.0, above every rng.random() value
    drawn = _draw(rng, cdf, owner.size)
    todo = np.arange(owner.size)
    for _ in range(max_rounds):
        todo = todo[_is_member(owner[todo] * n_items + drawn[todo], pos_keys)]
        if todo.size == 0:
            negatives: npt.NDArray[np.int64] = catalog_arr[drawn].reshape(users.size, n_negatives)
            return negatives
        drawn[todo] = _draw(rng, cdf, todo.size)
    raise RuntimeError(
        f"{todo.size} negatives still collide with positives after {max_rounds} rounds; "
        "some users' positives cover almost all of the sampling mass"
    )


def _is_member(
    keys: npt.NDArray[np.int64], sorted_keys: npt.NDArray[np.int64]
) -> npt.NDArray[np.bool_]:
    """``np.isin(keys, sorted_keys)`` by binary search; skips isin's de-duplication of ``keys``."""
    if sorted_keys.size == 0:
        return np.zeros(keys.size, dtype=bool)
    at = np.searchsorted(sorted_keys, keys).clip(max=sorted_keys.size - 1)
    found: npt.NDArray[np.bool_] = sorted_keys[at] == keys
    return found


def _draw(rng: np.random.Generator, cdf: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.int64]:
    """``n`` catalog indices drawn from the distribution with cumulative sums ``cdf``.

    Inverse-CDF by binary search; unlike ``rng.choice(p=...)`` this does not rebuild and
    re-validate the CDF on every redraw round. Zero-probability items repeat the previous
    CDF value, so ``side="right"`` never lands on them.
    """
    return np.searchsorted(cdf, rng.random(n), side="right").astype(np.int64)


def _check_users_have_room(
    pos_keys: npt.NDArray[np.int64],
    n_items: int,
    probs: npt.NDArray[np.float64],
    user_uniques: npt.NDArray[Any],
) -> None:
    """Fail if some user's positives cover every item that can be drawn (no negative exists)."""
    pos_users, pos_items = np.divmod(pos_keys, n_items)
    drawable = probs[pos_items] > 0
    covered = np.bincount(pos_users[drawable], minlength=user_uniques.size)
    full = covered >= np.count_nonzero(probs)
    if full.any():
        raise ValueError(
            f"{int(full.sum())} users have positives for every item that can be sampled "
            f"({np.count_nonzero(probs)} items), e.g. user_id {user_uniques[full][:5].tolist()}; "
            "no negative exists for them: drop these users or widen the catalog"
        )


def sample_negatives(
    positives: pd.DataFrame,
    catalog: npt.ArrayLike,
    *,
    n_negatives: int = 4,
    strategy: NegativeStrategy = "uniform",
    alpha: float = 0.75,
    item_counts: npt.ArrayLike | None = None,
    seed: Seed = None,
    carry_columns: Sequence[str] = ("ts",),
) -> pd.DataFrame:
    """Positives of a window plus sampled negatives, as one labelled frame.

    Args:
        positives: events of one window, with ``user_id`` and ``item_id`` columns.
        catalog: (n_items,) distinct item ids that may be drawn as negatives.
        n_negatives, strategy, alpha, item_counts, seed: as in :func:`sample_negative_items`.
        carry_columns: columns copied from each positive to its negatives when present
            (e.g. ``ts``, so point-in-time features of a negative use the positive's time).

    Returns:
        ``n_pos * (1 + n_negatives)`` rows: ``user_id``, ``item_id``, ``label`` (int8, 1 for the
        positives first in input order, then 0 for the negatives, grouped by positive),
        plus the carried columns.
    """
    missing = {"user_id", "item_id"} - set(positives.columns)
    if missing:
        raise ValueError(f"positives is missing column(s) {sorted(missing)}")
    negatives = sample_negative_items(
        positives["user_id"].to_numpy(),
        positives["item_id"].to_numpy(),
        catalog,
        n_negatives=n_negatives,
        strategy=strategy,
        alpha=alpha,
        item_counts=item_counts,
        seed=seed,
    )
    carried = [c for c in carry_columns if c in positives.columns]
    pos = positives[["user_id", "item_id", *carried]].reset_index(drop=True)
    neg = pos.loc[pos.index.repeat(n_negatives)].reset_index(drop=True)
    neg["item_id"] = negatives.ravel()
    out = pd.concat([pos.assign(label=1), neg.assign(label=0)], ignore_index=True)
    out["label"] = out["label"].astype(np.int8)
    return out[["user_id", "item_id", "label", *carried]]


# --- negative downsampling and its correction ---------------------------------------------


def _check_keep_rate(keep_rate: float) -> None:
    if not (0.0 < keep_rate <= 1.0):  # also rejects NaN
        raise ValueError(
            f"keep_rate (the fraction of negatives kept) must be in (0, 1], got {keep_rate}"
        )


def _check_labels(y: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    labels = np.asarray(y)
    if labels.ndim != 1 or not np.isin(labels, [0, 1]).all():
        raise ValueError("labels must be a 1-D array of 0/1 (or booleans)")
    return labels.astype(bool)


def downsample_negatives_mask(
    y: npt.ArrayLike, *, keep_rate: float, seed: Seed = None
) -> npt.NDArray[np.bool_]:
    """Mask keeping every positive and each negative independently with probability ``keep_rate``.

    Args:
        y: (n_samples,) labels 0/1.
        keep_rate: ``w`` in (0, 1], the probability of keeping a negative.
        seed: seed or generator.

    Returns:
        (n_samples,) boolean mask of the rows to keep.
    """
    _check_keep_rate(keep_rate)
    positive = _check_labels(y)
    rng = np.random.default_rng(seed)
    return positive | (rng.random(positive.size) < keep_rate)


def downsample_negatives(
    frame: pd.DataFrame, *, keep_rate: float, label_col: str = "label", seed: Seed = None
) -> pd.DataFrame:
    """Rows of ``frame`` kept by :func:`downsample_negatives_mask` on ``frame[label_col]``."""
    if label_col not in frame.columns:
        raise ValueError(f"frame has no label column {label_col!r}")
    mask = downsample_negatives_mask(frame[label_col].to_numpy(), keep_rate=keep_rate, seed=seed)
    return frame.loc[mask]


def recalibrate_downsampled(y_prob: npt.ArrayLike, keep_rate: float) -> npt.NDArray[np.float64]:
    """Map probabilities of a model trained on negative-downsampled data back to the world.

    Downsampling multiplies the odds of a click by ``1 / w``, so a calibrated model of the
    downsampled data predicts ``p' = p / (p + (1 - p) w)``; inverting gives
    ``q = p' / (p' + (1 - p') / w)``, which equals the true ``p``.

    Args:
        y_prob: (n_samples,) probabilities predicted by the model trained on downsampled data.
        keep_rate: ``w`` in (0, 1], the negative keep rate used for training.

    Returns:
        (n_samples,) recalibrated probabilities.

    Example:
        >>> recalibrate_downsampled([0.5], 0.1).round(6).tolist()
        [0.090909]
    """
    _check_keep_rate(keep_rate)
    p = np.asarray(y_prob, dtype=np.float64)
    if np.isnan(p).any() or p.min(initial=0.0) < 0.0 or p.max(initial=0.0) > 1.0:
        raise ValueError("y_prob must hold probabilities in [0, 1] without NaN")
    return p / (p + (1.0 - p) / keep_rate)


# --- class weights ---------------------------------------------------------------------------


def class_weights(y: npt.ArrayLike, *, kind: ClassWeightKind = "balanced") -> dict[Any, float]:
    """Weight of each class present in ``y``, to give rare classes more say in the loss.

    ``balanced`` is ``n_samples / (n_classes * count_c)`` (scikit-learn's
    ``compute_class_weight("balanced")``): every class carries equal total weight.
    ``balanced_sqrt`` is its square root, a milder boost when the imbalance is extreme.
    ``uniform`` gives every class 1.

    Args:
        y: (n_samples,) class labels.
        kind: ``"balanced"``, ``"balanced_sqrt"`` or ``"uniform"``.

    Returns:
        ``{label: weight}`` with plain Python labels, in sorted label order.
    """
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError("y must be a non-empty 1-D array of class labels")
    classes, counts = np.unique(labels, return_counts=True)
    balanced = labels.size / (classes.size * counts)
    if kind == "balanced":
        weights = balanced
    elif kind == "balanced_sqrt":
        weights = np.sqrt(balanced)
    elif kind == "uniform":
        weights = np.ones(classes.size)
    else:
        raise ValueError(f"kind must be 'balanced', 'balanced_sqrt' or 'uniform', got {kind!r}")
    return dict(zip(classes.tolist(), weights.tolist(), strict=True))


def sample_weights(
    y: npt.ArrayLike, *, class_weight: Mapping[Any, float] | ClassWeightKind = "balanced"
) -> npt.NDArray[np.float64]:
    """Per-sample weights from class weights, for ``fit(X, y, sample_weight=...)``.

    Args:
        y: (n_samples,) class labels.
        class_weight: ``{label: weight}`` or a ``kind`` understood by :func:`class_weights`.

    Returns:
        (n_samples,) weight of each sample's class.
    """
    labels = np.asarray(y)
    if isinstance(class_weight, str):
        weights: Mapping[Any, float] = class_weights(labels, kind=class_weight)
    else:
        weights = class_weight
    classes = np.unique(labels).tolist()
    missing = [c for c in classes if c not in weights]
    if missing:
        raise ValueError(f"class_weight has no weight for label(s) {missing}")
    classes_arr = np.asarray(classes)
    lookup = np.array([weights[c] for c in classes], dtype=np.float64)
    return lookup[np.searchsorted(classes_arr, labels)]


# --- SMOTE -----------------------------------------------------------------------------------


def smote(
    X: npt.ArrayLike,  # noqa: N803 (scikit-learn's name for the feature matrix)
    y: npt.ArrayLike,
    *,
    sampling_strategy: float | str | Mapping[Any, int] = "auto",
    k_neighbors: int = 5,
    seed: Seed = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[Any]]:
    """Oversample minority classes with SMOTE (imbalanced-learn) on dense tabular features.

    Each synthetic row is ``x + u * (x_nn - x)`` with ``x`` a minority row, ``x_nn`` one of its
    ``k_neighbors`` nearest minority neighbours and ``u ~ U(0, 1)``.

    Args:
        X: (n_samples, n_features) dense numeric features without NaN.
        y: (n_samples,) class labels.
        sampling_strategy: as in ``imblearn.over_sampling.SMOTE``: ``"auto"`` brings every
            minority class up to the majority count; a float is the minority/majority
            ratio wanted (binary only); a dict gives the target count per class.
        k_neighbors: neighbours to interpolate towards; each oversampled class needs at least
            ``k_neighbors + 1`` rows.
        seed: seed or generator.

    Returns:
        ``(X_res, y_res)``: the input rows unchanged first, synthetic rows appended.
    """
    from imblearn.over_sampling import SMOTE  # heavy import, only when used
    from imblearn.utils import check_sampling_strategy

    features = np.asarray(X, dtype=np.float64)
    labels = np.asarray(y)
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.size:
        raise ValueError(
            f"X must be 2-D (n_samples, n_features) and y 1-D of n_samples, got X "
            f"{features.shape} and y {labels.shape}"
        )
    if not np.isfinite(features).all():
        raise ValueError("X has NaN or infinite values; impute them before SMOTE")
    if np.unique(labels).size < 2:
        raise ValueError("SMOTE needs at least two classes in y")
    if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
        raise ValueError(f"k_neighbors must be a positive integer, got {k_neighbors!r}")
    targets = check_sampling_strategy(sampling_strategy, labels, "over-sampling")
    for label, n_new in targets.items():
        label = label.item() if isinstance(label, np.generic) else label
        n_rows = int(np.count_nonzero(labels == label))
        if n_new > 0 and n_rows <= k_neighbors:
            raise ValueError(
                f"SMOTE needs at least k_neighbors + 1 = {k_neighbors + 1} rows of class "
                f"{label!r} to interpolate between neighbours, got {n_rows}; lower k_neighbors "
                "or use random oversampling / class weights for this class"
            )
    random_state = int(np.random.default_rng(seed).integers(2**31 - 1))
    sampler = SMOTE(
        sampling_strategy=sampling_strategy, k_neighbors=k_neighbors, random_state=random_state
    )
    X_res, y_res = sampler.fit_resample(features, labels)  # noqa: N806
    return np.asarray(X_res, dtype=np.float64), np.asarray(y_res)
