"""Preference losses on log-ratio estimates, as pure per-example functions.

Each loss takes `h = Delta(x, y_w) - Delta(x, y_l)`, the chosen log-ratio minus the rejected one
(policy minus reference, from any estimator), and returns one loss per pair. All of them need a
reference model (h is a difference of policy/reference ratios).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO: -log sigmoid(beta h); with label_smoothing eps, conservative DPO
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

    h = [0, 10, -10], beta = 0.1: -log sigmoid([0, 1, -1]) = [log 2, log(1 + e^-1), log(1 + e)]
    = [0.693147, 0.313262, 1.313262].
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO: (h - 1 / (2 beta))^2.

    h = [0, 5, 10], beta = 0.1: 1 / (2 beta) = 5, so [25, 0, 25].
    """
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SLiC hinge: max(0, 1 - beta h).

    h = [0, 10, 20], beta = 0.1: [1, 0, 0].
    """
    return torch.relu(1 - beta * h)


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (unbiased under preference-label flips with rate eps):
    [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps).

    h = [0, 10, -10], beta = 0.1, eps = 0.25 (so 1 - 2 eps = 0.5):
    h = 0: (-0.75 log 0.5 + 0.25 log 0.5) / 0.5 = -log 0.5 = 0.693147;
    h = 10: (0.75 * 0.313262 - 0.25 * 1.313262) / 0.5 = -0.186738;
    h = -10: (0.75 * 1.313262 - 0.25 * 0.313262) / 0.5 = 1.813262.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for the robust loss, got {label_smoothing}")
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


LOSSES = {"sigmoid": sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss, "robust": robust_loss}


def preference_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and the TRL-named reward metrics (per pair, detached)."""
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(LOSSES)}, got {loss_type!r}")
    losses = LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    chosen, rejected = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
    }
    return losses, metrics
