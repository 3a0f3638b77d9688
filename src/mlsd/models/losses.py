"""Training losses shared by the PyTorch models, as pure functions of logits and targets.

Every loss takes raw logits, never probabilities: ``sigmoid`` followed by ``log`` underflows to
``-inf`` for confident predictions, while ``logsigmoid`` stays finite for any logit.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 (the universal torch alias)
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Binary focal loss (Lin et al., 2017): cross-entropy scaled by ``(1 - p_t) ** gamma``.

    Easy examples (``p_t`` near 1) contribute little, so the many obvious negatives of a click
    log stop drowning out the hard ones. ``gamma=0, alpha=None`` is exactly
    ``F.binary_cross_entropy_with_logits``.

    Args:
        logits: any shape, raw scores.
        targets: same shape, in [0, 1] (soft targets are allowed).
        gamma: focusing exponent, >= 0.
        alpha: weight of the positive class (``1 - alpha`` for negatives); ``None`` = no weight.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (elementwise, the shape of ``logits``).

    Returns:
        A scalar, or the elementwise loss for ``reduction="none"``.
    """
    if gamma < 0:
        raise ValueError(f"focal_loss: gamma must be >= 0, got {gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"focal_loss: alpha must be in [0, 1] or None, got {alpha}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"focal_loss: reduction must be 'mean', 'sum' or 'none', not {reduction!r}"
        )
    targets = targets.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if gamma > 0:
        # log(1 - p_t) = log(t·σ(-x) + (1-t)·σ(x)), in log space so it never hits log(0) and its
        # gradient stays finite for any logit; for a hard target it is one logsigmoid.
        log_miss = torch.logaddexp(
            torch.log(targets) + F.logsigmoid(-logits),
            torch.log1p(-targets) + F.logsigmoid(logits),
        )
        loss = loss * torch.exp(gamma * log_miss)
    if alpha is not None:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
