import math

import pytest
import torch

import solov2_d2  # noqa: F401
from solov2_d2.losses import category_focal_loss, dice_loss


def test_dice_loss_matches_its_formula():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]], [[-5.0, -5.0], [-5.0, -5.0]]])
    targets = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    loss = dice_loss(logits, targets)
    p = [1 / (1 + math.exp(-v)) for v in (0.0, 2.0, -1.0, 3.0)]
    t = [0.0, 1.0, 1.0, 1.0]
    a = sum(pi * ti for pi, ti in zip(p, t))
    b = sum(pi * pi for pi in p) + 1e-3
    c = sum(ti * ti for ti in t) + 1e-3
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(1 - 2 * a / (b + c), rel=1e-6)
    # Empty target, near-empty prediction: the eps terms keep it finite; numerator 0 -> loss 1.
    assert loss[1].item() == pytest.approx(1.0, abs=1e-6)


def test_dice_loss_of_a_perfect_mask_is_near_zero():
    targets = torch.zeros(1, 8, 8)
    targets[0, 2:6, 2:6] = 1
    logits = (targets * 2 - 1) * 30
    assert dice_loss(logits, targets).item() == pytest.approx(0.0, abs=1e-3)


def test_category_focal_loss_matches_its_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]])
    labels = torch.tensor([1, 3])  # second row: background (C = 3)
    loss = category_focal_loss(logits, labels, torch.tensor(1), alpha=0.25, gamma=2.0)
    total = 0.0
    for i in range(2):
        for k in range(3):
            p = 1 / (1 + math.exp(-logits[i, k].item()))
            if labels[i] == k:
                total += -0.25 * (1 - p) ** 2 * math.log(p)
            else:
                total += -0.75 * p**2 * math.log(1 - p)
    assert loss.item() == pytest.approx(total / 2, rel=1e-5)  # / (positives + 1)


def test_category_focal_loss_normalises_by_positives_plus_one():
    logits = torch.randn(10, 4)
    labels = torch.full((10,), 4)
    one = category_focal_loss(logits, labels, torch.tensor(0))
    four = category_focal_loss(logits, labels, torch.tensor(3))
    assert one.item() == pytest.approx(4 * four.item(), rel=1e-6)
