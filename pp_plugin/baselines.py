"""Static structured pruning baselines: one keep-set of heads and MLP channels per layer.

Every baseline scores the heads and MLP channels of each pruned layer once,
from calibration data or weights, and keeps the same counts as Probe Pruning
(``ProbePruner.settings.kept_heads`` and ``kept_channels``), so pruning ratios
mean the same thing across methods. FLAP is the exception: it ranks all layers
against one global threshold under the same parameter budget.

Scores of a head are the sum of its o_proj input channels' scores, except for
the PP score, whose head score is the L2 norm defined in :mod:`pp_plugin.importance`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from .history import CalibrationHistory, ChannelHistory
from .importance import (
    column_fourth_power_norm,
    flap_channel_scores,
    pp_channel_scores,
    pp_head_scores,
    wanda_sp_channel_scores,
)
from .pruner import ProbePruner
from .runtime import LayerDecision

logger = logging.getLogger(__name__)


@dataclass
class LayerScores:
    """Scores of one layer's query heads (``[H]``) and MLP channels (``[I]``); higher is kept."""

    heads: torch.Tensor
    channels: torch.Tensor


def calibration_mean_square(history: ChannelHistory) -> torch.Tensor:
    """Return the mean of ``x_j**2`` over all calibration tokens, per input channel."""
    weights = history.count.to(history.squared_mean.dtype).unsqueeze(1)
    return (history.squared_mean * weights).sum(dim=0) / weights.sum().clamp(min=1)


def _head_sums(channel_scores: torch.Tensor, head_columns: torch.Tensor) -> torch.Tensor:
    return channel_scores[head_columns].sum(dim=1)


def wanda_sp_scores(pruner: ProbePruner, history: CalibrationHistory) -> dict[int, LayerScores]:
    """Return Wanda-sp scores ``sum_i |W_ij| * sqrt(mean x_j**2)`` of every pruned layer."""
    scores = {}
    for index in pruner.pruned_layers:
        group = pruner.groups[index]
        attention = wanda_sp_channel_scores(
            calibration_mean_square(history.attention[index]), group.layer.self_attn.o_proj.weight.detach()
        )
        mlp = wanda_sp_channel_scores(
            calibration_mean_square(history.mlp[index]), group.layer.mlp.down_proj.weight.detach()
        )
        scores[index] = LayerScores(heads=_head_sums(attention, group.attention.o_cols), channels=mlp)
    return scores


def probe_snapshot_scores(pruner: ProbePruner, history: CalibrationHistory) -> dict[int, LayerScores]:
    """Return PP scores from calibration history alone (no probe).

    With no probe the fused statistic is the history itself, summed over positions.
    """
    scores = {}
    for index in pruner.pruned_layers:
        group = pruner.groups[index]
        attention_statistic = history.attention[index].squared_mean.sum(dim=0)
        mlp_statistic = history.mlp[index].squared_mean.sum(dim=0)
        o_norm = column_fourth_power_norm(group.layer.self_attn.o_proj.weight.detach())
        down_norm = column_fourth_power_norm(group.layer.mlp.down_proj.weight.detach())
        scores[index] = LayerScores(
            heads=pp_head_scores(attention_statistic, o_norm, group.attention.o_cols),
            channels=pp_channel_scores(mlp_statistic, down_norm),
        )
    return scores


def _group_scores(pruner: ProbePruner, importance: tp.importance.Importance) -> dict[int, LayerScores]:
    scores = {}
    for index in pruner.pruned_layers:
        group = pruner.groups[index]
        o_proj, down_proj = group.layer.self_attn.o_proj, group.layer.mlp.down_proj
        attention_group = pruner.DG.get_pruning_group(
            o_proj, tp.prune_linear_in_channels, idxs=list(range(o_proj.in_features))
        )
        mlp_group = pruner.DG.get_pruning_group(
            down_proj, tp.prune_linear_in_channels, idxs=list(range(down_proj.in_features))
        )
        attention = importance(attention_group).detach().float()
        scores[index] = LayerScores(
            heads=_head_sums(attention, group.attention.o_cols),
            channels=importance(mlp_group).detach().float(),
        )
    return scores


def magnitude_scores(pruner: ProbePruner) -> dict[int, LayerScores]:
    """Return torch-pruning's ``GroupMagnitudeImportance`` (L2) of every pruned layer's groups."""
    return _group_scores(pruner, tp.importance.GroupMagnitudeImportance(p=2))


def taylor_scores(pruner: ProbePruner, windows: torch.Tensor, batch_size: int, max_batches: int) -> dict[int, LayerScores]:
    """Return torch-pruning's ``GroupTaylorImportance`` with gradients of the calibration loss.

    The next-token loss of up to ``max_batches`` calibration batches is
    back-propagated into the weights' ``.grad``, which is cleared afterwards.
    """
    model = pruner.model
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for start in range(0, min(windows.shape[0], max_batches * batch_size), batch_size):
                batch = windows[start:start + batch_size].to(device)
                model(batch, labels=batch, use_cache=False).loss.backward()
        return _group_scores(pruner, tp.importance.GroupTaylorImportance())
    finally:
        model.zero_grad(set_to_none=True)


def uniform_decisions(pruner: ProbePruner, scores: dict[int, LayerScores]) -> dict[int, LayerDecision]:
    """Keep the top-scored heads and channels of every layer, in PP's per-layer counts."""
    decisions = {}
    for index, layer_scores in scores.items():
        layout = pruner.groups[index].attention
        heads = torch.arange(layout.num_heads)
        if pruner.config.prune_attention:
            heads = _top(layer_scores.heads, pruner.settings.kept_heads)
        channels = torch.arange(pruner.groups[index].mlp.num_channels)
        if pruner.config.prune_mlp:
            channels = _top(layer_scores.channels, pruner.settings.kept_channels)
        decisions[index] = LayerDecision(
            heads=heads, kv_heads=torch.unique(layout.kv_of_head[heads]), channels=channels
        )
    return decisions


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    return torch.topk(scores.float(), min(count, scores.numel()), sorted=False).indices.sort().values.cpu()


def _standardise(scores: torch.Tensor) -> torch.Tensor:
    std = scores.std()
    return (scores - scores.mean()) / (std if bool(std > 0) else 1)


def flap_decisions(
    pruner: ProbePruner, history: CalibrationHistory
) -> tuple[dict[int, LayerDecision], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Return FLAP's keep-sets and bias compensation for every pruned layer.

    Fluctuation scores ``var_j * ||W[:, j]||**2`` (a head sums its channels) are
    standardised per layer and per structure, then ranked across all layers.
    Units are removed from the lowest score up until the removed parameters
    reach what the uniform methods remove. A head weighs its parameter count
    (q and o rows, plus its share of k and v) relative to one MLP channel
    (gate, up and down). Every layer keeps at least one head and ``round_to``
    channels, and kept MLP widths are rounded up to ``round_to`` afterwards.
    Bias compensation adds ``W[:, pruned] @ mean_x[pruned]`` to o_proj and down_proj.
    """
    config, settings = pruner.config, pruner.settings
    # The budget and every unit's weight are counted in MLP channels (3 x hidden size parameters).
    units = []
    fluctuation = {}
    budget = 0.0
    for index in pruner.pruned_layers:
        group = pruner.groups[index]
        layout, mlp_layout = group.attention, group.mlp
        o_weight = group.layer.self_attn.o_proj.weight.detach()
        down_weight = group.layer.mlp.down_proj.weight.detach()
        head_weight = 2 * layout.head_dim * (1 + layout.num_kv_heads / layout.num_heads) / 3
        attention = flap_channel_scores(history.attention[index].channel_var, o_weight)
        mlp = flap_channel_scores(history.mlp[index].channel_var, down_weight)
        fluctuation[index] = mlp
        if config.prune_attention:
            head_scores = _standardise(_head_sums(attention, layout.o_cols))
            units += [(float(score), index, "head", h, head_weight) for h, score in enumerate(head_scores)]
            budget += (layout.num_heads - settings.kept_heads) * head_weight
        if config.prune_mlp:
            units += [(float(score), index, "channel", c, 1.0) for c, score in enumerate(_standardise(mlp))]
            budget += mlp_layout.num_channels - settings.kept_channels

    removed = {index: {"head": set(), "channel": set()} for index in pruner.pruned_layers}
    removed_weight = 0.0
    for score, index, kind, unit, weight in sorted(units):
        if removed_weight >= budget:
            break
        total = pruner.groups[index].attention.num_heads if kind == "head" else pruner.groups[index].mlp.num_channels
        minimum = 1 if kind == "head" else min(config.round_to, total)
        if total - len(removed[index][kind]) <= minimum:
            continue
        removed[index][kind].add(unit)
        removed_weight += weight

    decisions, compensation = {}, {}
    for index in pruner.pruned_layers:
        group = pruner.groups[index]
        layout = group.attention
        heads = torch.tensor(sorted(set(range(layout.num_heads)) - removed[index]["head"]))
        pruned_channels = sorted(removed[index]["channel"])
        kept = group.mlp.num_channels - len(pruned_channels)
        rounded = min(group.mlp.num_channels, math.ceil(kept / config.round_to) * config.round_to)
        if rounded > kept:
            # Give back the best-scored pruned channels until the width is a multiple of round_to.
            order = sorted(pruned_channels, key=lambda c: float(fluctuation[index][c]), reverse=True)
            restored = set(order[: rounded - kept])
            pruned_channels = [c for c in pruned_channels if c not in restored]
        channels = torch.tensor(sorted(set(range(group.mlp.num_channels)) - set(pruned_channels)))
        decisions[index] = LayerDecision(
            heads=heads, kv_heads=torch.unique(layout.kv_of_head[heads]), channels=channels
        )
        pruned_columns = layout.o_cols[sorted(removed[index]["head"])].flatten()
        compensation[index] = (
            _compensation(group.layer.self_attn.o_proj, history.attention[index], pruned_columns),
            _compensation(group.layer.mlp.down_proj, history.mlp[index], torch.tensor(pruned_channels, dtype=torch.long)),
        )
    logger.info(
        "FLAP kept heads per layer %s and MLP channels per layer %s",
        [d.heads.numel() for d in decisions.values()], [d.channels.numel() for d in decisions.values()],
    )
    return decisions, compensation


def _compensation(linear: nn.Linear, history: ChannelHistory, pruned: torch.Tensor) -> torch.Tensor:
    """Return ``W[:, pruned] @ mean_x[pruned]``, the output the pruned input channels contributed on average."""
    if pruned.numel() == 0:
        return torch.zeros(linear.out_features, dtype=linear.weight.dtype)
    weight = linear.weight.detach()[:, pruned].double()
    return (weight @ history.channel_mean[pruned].to(weight)).to(linear.weight.dtype)
