"""Probe selection by residual importance.

A probe is a small set of (sample, position) pairs of the batch. Residual
importance of token (b, t) is the L2 norm of the residual stream x[b, t, :].
By default positions are chosen first, by the L2 norm of their importances over
the batch, and then samples, by the L2 norm of their importances over the chosen
positions. Padded tokens have zero importance, are never chosen when a real
token is available, and are masked out of every statistic downstream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class ProbeConfig(BaseModel):
    """Size and selection order of the probe.

    The defaults (5% of the samples, 50% of the positions, positions first) are
    those of Probe Pruning (Le et al., ICLR 2025).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    sample_ratio: float = Field(0.05, gt=0, le=1, description="share of the batch's samples in the probe")
    token_ratio: float = Field(0.5, gt=0, le=1, description="share of the batch's positions in the probe")
    order: Literal["tokens-first", "samples-first"] = Field(
        "tokens-first", description="which of positions and samples is selected first"
    )
    min_tokens: int = Field(2, ge=1, description="lower bound on the number of probe positions")


@dataclass(frozen=True)
class Probe:
    """Selected rows and columns of a batch.

    Attributes:
        samples: ``[S]`` row indices, ascending.
        positions: ``[P]`` column indices, ascending.
        mask: ``[S, P]`` True where the selected token is real (not padding).
    """

    samples: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return ``tensor[samples][:, positions]`` for a ``[B, T, ...]`` tensor.

        A tensor with a batch dimension of 1 (shared over samples) is broadcast.
        """
        rows = tensor if tensor.shape[0] == 1 else tensor.index_select(0, self.samples)
        taken = rows.index_select(1, self.positions)
        if taken.shape[0] == 1 and self.samples.numel() > 1:
            taken = taken.expand(self.samples.numel(), *taken.shape[1:])
        return taken


def residual_importance(residual: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Return the ``[B, T]`` L2 norm over the hidden size, zero at padded tokens."""
    return torch.linalg.vector_norm(residual.float(), dim=-1) * padding_mask


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k, sorted=False).indices.sort().values


def select_probe(residual: torch.Tensor, padding_mask: torch.Tensor, config: ProbeConfig) -> Probe:
    """Select the probe of a batch from its residual stream.

    Args:
        residual: ``[B, T, D]`` residual stream entering the sub-block.
        padding_mask: ``[B, T]`` bool, True at real tokens.
        config: probe size and order.

    Counts are taken over the samples and positions that hold at least one real
    token, so appending padded rows or columns to a batch leaves the probe's
    real tokens unchanged.
    """
    mask = padding_mask.bool()
    importance = residual_importance(residual, mask)
    real_positions = int(mask.any(dim=0).sum())
    real_samples = int(mask.any(dim=1).sum())
    num_positions = min(max(math.ceil(config.token_ratio * real_positions), config.min_tokens), real_positions)
    num_samples = max(1, min(math.ceil(config.sample_ratio * real_samples), real_samples))

    if config.order == "tokens-first":
        positions = _top_sorted(torch.linalg.vector_norm(importance, dim=0), num_positions)
        samples = _top_sorted(torch.linalg.vector_norm(importance[:, positions], dim=1), num_samples)
    else:
        samples = _top_sorted(torch.linalg.vector_norm(importance, dim=1), num_samples)
        positions = _top_sorted(torch.linalg.vector_norm(importance[samples], dim=0), num_positions)
    return Probe(samples=samples, positions=positions, mask=mask[samples][:, positions])


def full_batch_probe(padding_mask: torch.Tensor) -> Probe:
    """Return the probe that is the whole batch (full-batch probing)."""
    batch, length = padding_mask.shape
    device = padding_mask.device
    return Probe(
        samples=torch.arange(batch, device=device),
        positions=torch.arange(length, device=device),
        mask=padding_mask.bool(),
    )
