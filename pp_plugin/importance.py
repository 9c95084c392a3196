"""Channel and head importance scores of Probe Pruning and related structured pruners.

All scores are computed in fp32, because W**4 underflows in fp16. ``W`` is the
weight of the layer whose input channels are scored (o_proj for attention
heads, down_proj for MLP channels), shape ``[out_features, in_features]``, and
``C`` is a per-input-channel activation statistic.

- PP ("ppwandasp" in the reference code): channel j scores
  ``|| C_j * W[:, j]**2 ||_2 = C_j * sqrt(sum_i W_ij**4)``. Head h scores the L2
  norm of ``C_j * W_ij**2`` over all rows i and the head's columns j.
- Wanda-sp: ``sum_i |W_ij| * sqrt(C_j)``.
- FLAP fluctuation: ``var_j * ||W[:, j]||_2**2``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp

#: Added to the denominator of the fusion weight to avoid dividing by zero.
FUSION_EPSILON = 1e-6


def fuse_probe_with_history(
    probe_statistic: torch.Tensor,
    history: torch.Tensor | None,
    valid_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fuse the probe's squared activations with calibration history into ``C``.

    Args:
        probe_statistic: ``[P, C]`` mean over probe samples of x**2 per probe position.
        history: ``[P, C]`` calibration history at the same positions, or None
            to score the probe alone.
        valid_positions: ``[P]`` bool, False where no probe sample is real; such
            positions are left out of the sum.

    Returns:
        ``[C]`` fp32 statistic: the sum over positions of
        ``(1 - p) * H + p * P`` with ``p = P / (P + H + eps)``, or of P without history.
    """
    probe_statistic = probe_statistic.float()
    if history is None:
        fused = probe_statistic
    else:
        history = history.float()
        weight = probe_statistic / (probe_statistic + history + FUSION_EPSILON)
        fused = (1 - weight) * history + weight * probe_statistic
    if valid_positions is not None:
        fused = fused * valid_positions.unsqueeze(1)
    return fused.sum(dim=0)


def column_fourth_power_norm(weight: torch.Tensor) -> torch.Tensor:
    """Return ``sqrt(sum_i W_ij**4)`` for every input column j, in fp32."""
    return weight.float().pow(4).sum(dim=0).sqrt()


def pp_channel_scores(statistic: torch.Tensor, fourth_power_norm: torch.Tensor) -> torch.Tensor:
    """Return the PP score ``C_j * sqrt(sum_i W_ij**4)`` of every input channel."""
    return statistic.float() * fourth_power_norm


def pp_head_scores(
    statistic: torch.Tensor, fourth_power_norm: torch.Tensor, head_columns: torch.Tensor
) -> torch.Tensor:
    """Return the PP score of every head.

    Args:
        statistic: ``[C]`` fused statistic of o_proj's input channels.
        fourth_power_norm: ``[C]`` from :func:`column_fourth_power_norm` of o_proj.
        head_columns: ``[H, head_dim]`` o_proj input columns of each head.
    """
    per_channel = pp_channel_scores(statistic, fourth_power_norm)[head_columns]
    return torch.linalg.vector_norm(per_channel, dim=1)


def wanda_sp_channel_scores(statistic: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return the Wanda-sp score ``sum_i |W_ij| * sqrt(C_j)`` of every input channel."""
    return weight.float().abs().sum(dim=0) * statistic.float().clamp(min=0).sqrt()


def flap_channel_scores(variance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return the FLAP fluctuation score ``var_j * ||W[:, j]||**2`` of every input channel."""
    return variance.float() * weight.float().square().sum(dim=0)


class PPImportance(tp.importance.Importance):
    """PP importance of a torch-pruning group rooted at the input channels of o_proj or down_proj.

    Static use: the statistic of each root module (for example the calibration
    history summed over positions) is given in ``statistics``. The score of a
    root channel j is ``(C_j * sqrt(sum_i W_ij**4)) ** 2``: squared so that a
    pruner summing channel scores over a head (torch-pruning's head pruning)
    ranks heads by the squared PP head norm, which orders heads exactly like
    :func:`pp_head_scores`. Channel rankings equal those of :func:`pp_channel_scores`.
    """

    def __init__(self, statistics: dict[nn.Module, torch.Tensor]):
        self.statistics = statistics

    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        root = group.items[0]
        module = root.dep.target.module
        if module not in self.statistics or root.dep.handler != tp.prune_linear_in_channels:
            return None
        channels = torch.as_tensor(root.idxs, dtype=torch.long)
        weight = module.weight.detach()[:, channels]
        statistic = self.statistics[module].to(weight.device)[channels]
        return pp_channel_scores(statistic, column_fourth_power_norm(weight)).square()
