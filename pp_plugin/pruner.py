"""ProbePruner: Probe Pruning attached to a Hugging Face causal LM.

Usage::

    pruner = ProbePruner(model, ProbePruningConfig(pruning_ratio=0.4))
    pruner.calibrate(calibration_windows, batch_size=8)
    with pruner.attached():
        logits = model(input_ids, attention_mask=attention_mask).logits

While attached, the model's ordinary ``forward`` prunes attention heads and MLP
channels of every pruned layer per batch. Detaching restores the dense forward
exactly: the weights are never modified.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
import torch.nn as nn
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import PPPluginError
from .graph import decoder_layers, dependency_graph_kwargs, extract_layer_groups, traceable
from .history import CalibrationHistory, HistoryConfig, collect_history
from .importance import PPImportance
from .probe import ProbeConfig
from .runtime import LayerDecision, PrunedLayerRuntime, RuntimeCounters, SubBlockSettings, kept_count

logger = logging.getLogger(__name__)


class StructureConfig(BaseModel):
    """Scope and amount of pruning, shared by Probe Pruning and the static baselines."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pruning_ratio: float = Field(0.4, ge=0, lt=1, description="share of heads and MLP channels removed model-wide")
    skip_layers: list[int] = Field(
        default_factory=lambda: [0, 1, 2], description="decoder layers that are never pruned"
    )
    prune_attention: bool = Field(True, description="prune query heads (and k/v heads left without queries)")
    prune_mlp: bool = Field(True, description="prune MLP intermediate channels")
    round_to: int = Field(
        64, ge=1, description="kept MLP width is rounded up to a multiple of this (GEMM-friendly width)"
    )
    label: str | None = Field(None, description="name shown in result tables instead of the method name")

    @field_validator("skip_layers")
    @classmethod
    def _unique_non_negative(cls, layers: list[int]) -> list[int]:
        if any(layer < 0 for layer in layers):
            raise ValueError(f"layer indices must be >= 0, got {layers}")
        return sorted(set(layers))


class ProbePruningConfig(StructureConfig):
    """Settings of Probe Pruning; the defaults follow the paper (Le et al., ICLR 2025)."""

    full_batch: bool = Field(
        False, description="probe the whole batch (full-batch probing, the quality upper bound)"
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)


def layer_pruning_ratio(ratio: float, num_layers: int, skipped: int) -> float:
    """Return the per-layer ratio that removes ``ratio`` of the model while skipping layers.

    ``round(L / (L - skipped) * ratio, 2)``, as in Probe Pruning; for LLaMA-2-7B
    (32 layers, 3 skipped) at 0.40 this gives 0.44.

    Raises:
        PPPluginError: every layer is skipped, or the raised ratio reaches 1.
    """
    if skipped >= num_layers:
        raise PPPluginError(
            f"all {num_layers} decoder layers are in skip_layers, so nothing can be pruned; "
            "remove some indices from skip_layers."
        )
    raised = round(num_layers / (num_layers - skipped) * ratio, 2)
    if raised >= 1:
        raise PPPluginError(
            f"pruning_ratio {ratio} with {skipped} of {num_layers} layers skipped needs a per-layer "
            f"ratio of {raised}, which removes whole layers; lower pruning_ratio or skip fewer layers."
        )
    return raised


class ProbePruner(tp.pruner.BasePruner):
    """Probe Pruning on torch-pruning's dependency graph.

    The constructor traces the model (torch-pruning's ``BasePruner`` builds the
    graph) and resolves each layer's head and channel groups from it.
    :meth:`calibrate` (or :meth:`set_history`) provides calibration history;
    :meth:`attach` makes the model's forward prune per batch, :meth:`detach`
    restores it. ``step()`` is not available: PP decides per batch, at forward time.
    """

    def __init__(self, model: nn.Module, config: ProbePruningConfig | None = None):
        self.config = config or ProbePruningConfig()
        layers = decoder_layers(model)
        bad = [index for index in self.config.skip_layers if index >= len(layers)]
        if bad:
            raise PPPluginError(
                f"skip_layers {bad} do not exist: the model has {len(layers)} decoder layers "
                f"(indices 0..{len(layers) - 1})."
            )

        with traceable(model), torch.enable_grad():
            super().__init__(
                model,
                importance=PPImportance({}),
                pruning_ratio=self.config.pruning_ratio,
                root_module_types=[nn.Linear],
                **dependency_graph_kwargs(model),
            )
        self.groups = extract_layer_groups(model, self.DG)

        self.pruned_layers = [i for i in range(len(layers)) if i not in self.config.skip_layers]
        self.layer_ratio = (
            layer_pruning_ratio(self.config.pruning_ratio, len(layers), len(self.config.skip_layers))
            if self.config.pruning_ratio > 0 else 0.0
        )

        attention, mlp = self.groups[0].attention, self.groups[0].mlp
        self.settings = SubBlockSettings(
            probe=self.config.probe,
            full_batch=self.config.full_batch,
            history=self.config.history,
            kept_heads=kept_count(attention.num_heads, self.layer_ratio),
            kept_channels=kept_count(mlp.num_channels, self.layer_ratio, self.config.round_to),
            prune_attention=self.config.prune_attention,
            prune_mlp=self.config.prune_mlp,
        )

        self.calibrated_history: CalibrationHistory | None = None
        self.history: CalibrationHistory | None = None
        self.counters = RuntimeCounters()
        self._runtimes: list[PrunedLayerRuntime] = []
        self._hook = None
        self._padding_mask: torch.Tensor | None = None

        logger.info(
            "%d of %d layers pruned at per-layer ratio %.2f; uniform keep counts %d/%d heads "
            "and %d/%d MLP channels",
            len(self.pruned_layers), len(layers), self.layer_ratio, self.settings.kept_heads,
            attention.num_heads, self.settings.kept_channels, mlp.num_channels,
        )

    # -- calibration -------------------------------------------------------

    def calibrate(self, windows: torch.Tensor, batch_size: int) -> CalibrationHistory:
        """Collect calibration history with the dense model and use it from now on."""
        if self.is_attached:
            raise PPPluginError("calibrate() needs the dense model; call detach() first.")
        history = collect_history(self.model, self.groups, windows, batch_size)
        self.set_history(history)
        return history

    def set_history(self, history: CalibrationHistory | None) -> None:
        """Use ``history`` (None: probe only); test-time updates go to a private copy."""
        if history is not None:
            missing = [i for i in self.pruned_layers if i not in history.attention or i not in history.mlp]
            if missing:
                raise PPPluginError(
                    f"calibration history has no statistics for layers {missing}; recalibrate this model."
                )
        self.calibrated_history = history
        self.reset_history()

    def reset_history(self) -> None:
        """Discard test-time history updates and restart from the calibrated history."""
        self.history = None if self.calibrated_history is None else self.calibrated_history.clone()
        for runtime in self._runtimes:
            index = runtime.groups.layer_index
            runtime.attention_history = self.history.attention[index] if self.history else None
            runtime.mlp_history = self.history.mlp[index] if self.history else None

    # -- attaching ---------------------------------------------------------

    @property
    def is_attached(self) -> bool:
        return self._hook is not None

    def _build_runtimes(self) -> None:
        self._runtimes = [
            PrunedLayerRuntime(
                self.groups[index],
                self.settings,
                self.history.attention[index] if self.history else None,
                self.history.mlp[index] if self.history else None,
                self.counters,
                self._current_padding_mask,
            )
            for index in self.pruned_layers
        ]

    def attach(self) -> None:
        """Make the model's forward prune per batch; cheap after the first call."""
        if self.is_attached:
            return
        if self.history is None and self.config.history.enabled and not self.config.full_batch:
            raise PPPluginError(
                "Probe Pruning with history needs calibration; call calibrate() or set_history() first, "
                "or set history.enabled: false to score the probe alone."
            )
        if not self._runtimes:
            self._build_runtimes()
        for runtime in self._runtimes:
            runtime.attach()
        self._hook = self.model.register_forward_pre_hook(self._capture_padding_mask, with_kwargs=True)

    def detach(self) -> None:
        """Restore the dense forward of every layer."""
        for runtime in self._runtimes:
            runtime.detach()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._padding_mask = None

    def fix_decisions(self, decisions: dict[int, LayerDecision] | None) -> None:
        """Use one static decision per pruned layer instead of probing (None: probe again).

        Layers missing from ``decisions`` keep probing.
        """
        if not self._runtimes:
            self._build_runtimes()
        for runtime in self._runtimes:
            runtime.fixed_decision = None if decisions is None else decisions.get(runtime.groups.layer_index)

    def random_decisions(self, seed: int) -> dict[int, LayerDecision]:
        """Return a seeded uniformly random keep-set of heads and channels for every pruned layer."""
        generator = torch.Generator().manual_seed(seed)
        decisions = {}
        for index in self.pruned_layers:
            attention, mlp = self.groups[index].attention, self.groups[index].mlp
            heads = torch.randperm(attention.num_heads, generator=generator)[: self.settings.kept_heads].sort().values
            if not self.config.prune_attention:
                heads = torch.arange(attention.num_heads)
            channels = torch.randperm(mlp.num_channels, generator=generator)[: self.settings.kept_channels]
            if not self.config.prune_mlp:
                channels = torch.arange(mlp.num_channels)
            decisions[index] = LayerDecision(
                heads=heads, kv_heads=torch.unique(attention.kv_of_head[heads]), channels=channels.sort().values
            )
        return decisions

    @contextlib.contextmanager
    def attached(self) -> Iterator["ProbePruner"]:
        """Attach for the duration of a ``with`` block."""
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def step(self, interactive: bool = False):
        raise PPPluginError(
            "ProbePruner prunes per batch at forward time and has no static step(); "
            "use attach() or attached()."
        )

    # -- padding -----------------------------------------------------------

    def _capture_padding_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._padding_mask = mask.bool() if mask is not None and mask.ndim == 2 else None

    def _current_padding_mask(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """Return the ``[batch, length]`` real-token mask of the current forward's new tokens."""
        mask = self._padding_mask
        if mask is None or mask.shape[0] != batch:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        return mask[:, -length:].to(device)
