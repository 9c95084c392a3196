"""Calibration history: per-position input statistics of o_proj and down_proj.

For the input x of each pruned o_proj and down_proj, the history stores
``H[t, j]``: the mean over calibration samples of ``x[t, j] ** 2`` at absolute
position t and input channel j (fp32, ``[max_seq_len, in_features]``). It also
stores the per-channel mean and variance of x over all calibration tokens,
which the FLAP score and bias compensation use. Histories are cached on disk under a key
made of the model, the data and the settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from .cache import atomic_write_path, cache_dir
from .errors import CacheError, PPPluginError
from .graph import LayerGroups

logger = logging.getLogger(__name__)

#: Bumped whenever the stored statistics change meaning, so old cache files are
#: not mistaken for new ones.
HISTORY_FORMAT_VERSION = 1


class HistoryConfig(BaseModel):
    """Use of calibration history in the PP score, and its test-time update."""

    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = Field(True, description="fuse the probe with calibration history; False scores the probe alone")
    update: Literal["ema", "running-mean", "none"] = Field(
        "ema", description="update of the kept channels' history after each batch"
    )
    ema_decay: float = Field(0.99, ge=0, lt=1, description="weight of the old value in the EMA update")


@dataclass
class ChannelHistory:
    """Statistics of one linear layer's input channels.

    Attributes:
        squared_mean: ``[max_seq_len, C]`` mean of x**2 per position (fp32).
        count: ``[max_seq_len]`` samples averaged into each position (fp64).
        channel_mean: ``[C]`` mean of x over all calibration tokens (fp64).
        channel_var: ``[C]`` variance of x over all calibration tokens (fp64).
    """

    squared_mean: torch.Tensor
    count: torch.Tensor
    channel_mean: torch.Tensor
    channel_var: torch.Tensor

    @property
    def max_length(self) -> int:
        return self.squared_mean.shape[0]

    def at_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Return ``H`` at absolute ``positions`` (any shape), clamped to the calibrated length."""
        clamped = positions.clamp(max=self.max_length - 1)
        return self.squared_mean.index_select(0, clamped.flatten()).view(*clamped.shape, -1)

    def update(
        self,
        channels: torch.Tensor,
        squared_sums: torch.Tensor,
        counts: torch.Tensor,
        mode: str,
        ema_decay: float,
    ) -> None:
        """Fold one batch into the history of the kept ``channels``.

        Args:
            channels: ``[K]`` kept input channels.
            squared_sums: ``[max_seq_len, K]`` sum over real samples of x**2 per position.
            counts: ``[max_seq_len]`` real samples per position; positions with
                zero count keep their old value.
            mode: ``"ema"`` or ``"running-mean"``.
            ema_decay: weight of the old value in the EMA update.
        """
        seen = counts > 0
        if not bool(seen.any()):
            return
        rows = seen.nonzero().squeeze(1)
        # index_select/index_copy_ instead of advanced indexing: several times faster on CPU.
        block = self.squared_mean.index_select(0, rows)
        old = block.index_select(1, channels)
        batch_mean = squared_sums.index_select(0, rows) / counts.index_select(0, rows).unsqueeze(1)
        if mode == "ema":
            new = ema_decay * old + (1 - ema_decay) * batch_mean
        else:
            previous = self.count.index_select(0, rows).unsqueeze(1).to(old.dtype)
            added = counts.index_select(0, rows).unsqueeze(1).to(old.dtype)
            new = (old * previous + squared_sums.index_select(0, rows)) / (previous + added)
            self.count.index_add_(0, rows, counts.index_select(0, rows).to(self.count.dtype))
        block.index_copy_(1, channels, new.to(block.dtype))
        self.squared_mean.index_copy_(0, rows, block)


@dataclass
class CalibrationHistory:
    """Input statistics of every pruned layer's o_proj (attention) and down_proj (mlp)."""

    attention: dict[int, ChannelHistory] = field(default_factory=dict)
    mlp: dict[int, ChannelHistory] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def clone(self) -> "CalibrationHistory":
        """Return a deep copy, so test-time updates never touch the calibrated state."""
        return copy.deepcopy(self)

    def save(self, path: Path) -> None:
        """Write the history to ``path`` atomically."""
        payload = {
            "format_version": HISTORY_FORMAT_VERSION,
            "metadata": self.metadata,
            "attention": {str(k): vars(v) for k, v in self.attention.items()},
            "mlp": {str(k): vars(v) for k, v in self.mlp.items()},
        }
        with atomic_write_path(path) as temporary:
            torch.save(payload, temporary)

    @classmethod
    def load(cls, path: Path, expected_metadata: dict | None = None) -> "CalibrationHistory":
        """Read a history written by :meth:`save`.

        Raises:
            CacheError: the file is unreadable or corrupt, has another format
                version, or was written for other settings than ``expected_metadata``.
        """
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            version = payload["format_version"]
            metadata = payload["metadata"]
            attention = {int(k): ChannelHistory(**v) for k, v in payload["attention"].items()}
            mlp = {int(k): ChannelHistory(**v) for k, v in payload["mlp"].items()}
        except Exception as error:  # torch.load raises many types on a damaged file
            # torch's own message advises weights_only=False, which is unsafe and wrong here,
            # so only the exception type is shown; the chained exception keeps the details.
            raise CacheError(
                f"calibration history cache {path} is unreadable or corrupt ({type(error).__name__}); "
                "delete the file and run again to recalibrate."
            ) from error
        if version != HISTORY_FORMAT_VERSION:
            raise CacheError(
                f"calibration history cache {path} has format version {version}, expected "
                f"{HISTORY_FORMAT_VERSION}; delete the file and run again to recalibrate."
            )
        if expected_metadata is not None and metadata != expected_metadata:
            raise CacheError(
                f"calibration history cache {path} was written for other settings "
                f"({metadata}) than requested ({expected_metadata}); delete the file to recalibrate."
            )
        return cls(attention=attention, mlp=mlp, metadata=metadata)


class _InputStatistics:
    """Accumulates per-position squared sums and per-channel moments of a layer input."""

    def __init__(self, max_length: int, channels: int, device: torch.device):
        self.squared_sum = torch.zeros(max_length, channels, dtype=torch.float64, device=device)
        self.count = torch.zeros(max_length, dtype=torch.float64, device=device)
        self.channel_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.channel_squared_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        values = inputs.detach().to(torch.float64)
        length = values.shape[1]
        squared = values.square()
        self.squared_sum[:length] += squared.sum(dim=0)
        self.count[:length] += values.shape[0]
        self.channel_sum += values.sum(dim=(0, 1))
        self.channel_squared_sum += squared.sum(dim=(0, 1))
        self.tokens += values.shape[0] * length

    def finish(self) -> ChannelHistory:
        seen = self.count.clamp(min=1).unsqueeze(1)
        mean = self.channel_sum / max(self.tokens, 1)
        var = (self.channel_squared_sum / max(self.tokens, 1) - mean.square()).clamp(min=0)
        return ChannelHistory(
            squared_mean=(self.squared_sum / seen).float().cpu(),
            count=self.count.cpu(),
            channel_mean=mean.cpu(),
            channel_var=var.cpu(),
        )


@torch.no_grad()
def collect_history(
    model: nn.Module,
    groups: list[LayerGroups],
    windows: torch.Tensor,
    batch_size: int,
    layer_indices: list[int] | None = None,
) -> CalibrationHistory:
    """Run the dense model over calibration windows and record input statistics.

    Args:
        model: dense causal LM (no pruning runtime attached).
        groups: layer groups from :func:`pp_plugin.graph.extract_layer_groups`.
        windows: ``[N, T]`` token ids with no padding.
        batch_size: windows per forward pass.
        layer_indices: layers to record; all layers when None.
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise PPPluginError(
            f"calibration needs a non-empty [N, T] tensor of token ids, got shape {tuple(windows.shape)}; "
            "raise data.calibration_windows or supply more calibration text."
        )
    if batch_size < 1:
        raise PPPluginError(f"batch_size must be at least 1, got {batch_size}.")
    wanted = set(range(len(groups)) if layer_indices is None else layer_indices)
    device = next(model.parameters()).device
    length = windows.shape[1]
    statistics: dict[tuple[str, int], _InputStatistics] = {}
    handles = []
    for group in groups:
        if group.layer_index not in wanted:
            continue
        for kind, module in (("attention", group.layer.self_attn.o_proj), ("mlp", group.layer.mlp.down_proj)):
            stats = _InputStatistics(length, module.in_features, device)
            statistics[(kind, group.layer_index)] = stats
            handles.append(module.register_forward_pre_hook(lambda _m, args, s=stats: s.add(args[0])))
    try:
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="calibration", unit="batch"):
            model(windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    history = CalibrationHistory()
    for (kind, layer_index), stats in statistics.items():
        getattr(history, kind)[layer_index] = stats.finish()
    return history


def history_cache_path(key: dict) -> Path:
    """Return the cache file of the history described by ``key`` (JSON-serialisable)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "history" / f"{digest}.pt"


def load_or_collect_history(
    model: nn.Module,
    groups: list[LayerGroups],
    windows: torch.Tensor,
    batch_size: int,
    key: dict,
    use_cache: bool = True,
) -> CalibrationHistory:
    """Return the cached history of every layer for ``key``, collecting and caching it when absent.

    All layers are recorded, so one cache file serves any choice of skipped layers.
    """
    metadata = {**key, "format_version": HISTORY_FORMAT_VERSION}
    path = history_cache_path(metadata)
    if use_cache and path.exists():
        logger.info("loading calibration history from %s", path)
        return CalibrationHistory.load(path, expected_metadata=metadata)
    history = collect_history(model, groups, windows, batch_size)
    history.metadata = metadata
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        history.save(path)
        logger.info("saved calibration history to %s", path)
    return history
