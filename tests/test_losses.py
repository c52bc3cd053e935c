"""Losses on three-element tensors; the arithmetic is written in each loss's docstring."""

import pytest
import torch

from dtrpo.losses import hinge_loss, ipo_loss, preference_loss, robust_loss, sigmoid_loss


def close(got, want):
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)


def test_sigmoid():
    close(sigmoid_loss(torch.tensor([0.0, 10.0, -10.0]), beta=0.1), [0.693147, 0.313262, 1.313262])


def test_sigmoid_label_smoothing_mixes_both_directions():
    # eps = 0.5 averages -log sigmoid(z) and -log sigmoid(-z): symmetric in h
    got = sigmoid_loss(torch.tensor([10.0, -10.0, 0.0]), beta=0.1, label_smoothing=0.5)
    close(got, [0.813262, 0.813262, 0.693147])


def test_ipo():
    close(ipo_loss(torch.tensor([0.0, 5.0, 10.0]), beta=0.1), [25.0, 0.0, 25.0])


def test_hinge():
    close(hinge_loss(torch.tensor([0.0, 10.0, 20.0]), beta=0.1), [1.0, 0.0, 0.0])


def test_robust():
    close(
        robust_loss(torch.tensor([0.0, 10.0, -10.0]), beta=0.1, label_smoothing=0.25), [0.693147, -0.186738, 1.813262]
    )
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_loss(torch.zeros(3), beta=0.1, label_smoothing=0.5)


def test_preference_loss_rewards_are_beta_scaled_logratios():
    losses, m = preference_loss(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.0, 1.0, 3.0]), beta=0.5)
    close(m["rewards/chosen"], [0.5, -1.0, 1.5])
    close(m["rewards/margins"], [0.5, -1.5, 0.0])
    close(m["rewards/accuracies"], [1.0, 0.0, 0.0])
    close(losses, sigmoid_loss(torch.tensor([1.0, -3.0, 0.0]), 0.5).tolist())
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(torch.zeros(1), torch.zeros(1), beta=0.1, loss_type="nope")
