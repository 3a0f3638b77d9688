from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from mlsd.models.losses import focal_loss


@pytest.fixture
def logits_targets() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(257, generator=generator, dtype=torch.float64) * 4
    targets = (torch.rand(257, generator=generator, dtype=torch.float64) < 0.3).double()
    return logits, targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gamma_zero_is_exactly_bce(
    logits_targets: tuple[torch.Tensor, torch.Tensor], reduction: str
) -> None:
    logits, targets = logits_targets
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)
    got = focal_loss(logits, targets, gamma=0.0, reduction=reduction)  # type: ignore[arg-type]
    assert torch.equal(got, expected)


def test_gamma_zero_is_bce_for_soft_targets() -> None:
    logits = torch.linspace(-6, 6, 13)
    targets = torch.linspace(0, 1, 13)
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.equal(focal_loss(logits, targets, gamma=0.0), expected)


def test_focal_matches_its_definition(logits_targets: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, targets = logits_targets
    p = torch.sigmoid(logits)
    p_t = targets * p + (1 - targets) * (1 - p)
    alpha_t = 0.25 * targets + 0.75 * (1 - targets)
    expected = -alpha_t * (1 - p_t) ** 2 * torch.log(p_t)
    got = focal_loss(logits, targets, gamma=2.0, alpha=0.25, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_focal_down_weights_easy_examples_relative_to_bce() -> None:
    # Same label, an easy (confidently right) and a hard (confidently wrong) example.
    logits = torch.tensor([4.0, -4.0])
    targets = torch.tensor([1.0, 1.0])
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    focal = focal_loss(logits, targets, gamma=2.0, reduction="none")
    easy_ratio, hard_ratio = (focal / bce).tolist()
    assert easy_ratio < 1e-3  # (1 - σ(4))² ≈ 3e-4
    assert hard_ratio > 0.9
    assert (focal <= bce).all()


def test_larger_gamma_focuses_more() -> None:
    logits, targets = torch.tensor([2.0]), torch.tensor([1.0])
    losses = [focal_loss(logits, targets, gamma=g).item() for g in (0.0, 1.0, 2.0, 5.0)]
    assert losses == sorted(losses, reverse=True)


def test_alpha_weights_the_classes() -> None:
    logits, targets = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])
    plain = focal_loss(logits, targets, gamma=2.0, reduction="none")
    weighted = focal_loss(logits, targets, gamma=2.0, alpha=0.8, reduction="none")
    torch.testing.assert_close(weighted, plain * torch.tensor([0.8, 0.2]))


def test_extreme_logits_give_finite_loss_and_gradients() -> None:
    logits = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    loss = focal_loss(logits, targets, gamma=2.0)
    torch.autograd.backward(loss)
    assert torch.isfinite(loss)
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    # Confidently right examples have (almost) no gradient, wrong ones a full one.
    assert logits.grad[1].abs() < 1e-12
    assert logits.grad[3].abs() < 1e-12
    assert logits.grad[0] < 0 < logits.grad[4]


def test_bad_options_are_rejected() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(x, x, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(x, x, alpha=1.5)
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(x, x, reduction="max")  # type: ignore[arg-type]
