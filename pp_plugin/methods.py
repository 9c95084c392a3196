"""Pruning methods selectable by name in a recipe.

Each method has a pydantic configuration (its recipe section, selected by the
``name`` field) and a :class:`PruningMethod` implementation. ``METHODS`` maps
names to both; :func:`create_method` rejects an unknown name with the list of
valid ones.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from .errors import RecipeError
from .baselines import (
    flap_decisions,
    magnitude_scores,
    probe_snapshot_scores,
    taylor_scores,
    uniform_decisions,
    wanda_sp_scores,
)
from .flops import dense_model_flops, model_flops
from .history import CalibrationHistory, HistoryConfig, load_or_collect_history
from .pruner import ProbePruner, ProbePruningConfig, StructureConfig
from .runtime import LayerDecision
from .static import apply_decisions


logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Calibration data shared by every method of one run.

    Attributes:
        windows: ``[N, T]`` calibration token ids, no padding.
        batch_size: windows per forward pass.
        cache_key: JSON-serialisable description of model, data and settings
            that keys the on-disk history cache; None disables the cache.
    """

    windows: torch.Tensor
    batch_size: int
    cache_key: dict | None = None
    _history: CalibrationHistory | None = None

    def history(self, model: nn.Module, pruner: ProbePruner) -> CalibrationHistory:
        """Return the dense model's calibration history, collected once per run."""
        if self._history is None:
            self._history = load_or_collect_history(
                model, pruner.groups, self.windows, self.batch_size,
                key=self.cache_key or {}, use_cache=self.cache_key is not None,
            )
        return self._history


class PruningMethod(abc.ABC):
    """A way of running a causal LM that :mod:`pp_plugin.evaluation` can measure."""

    name: ClassVar[str]

    def __init__(self, config: BaseModel):
        self.config = config

    @property
    def label(self) -> str:
        """Name of the method's rows in result tables: the configured label, else the method name."""
        return getattr(self.config, "label", None) or self.name

    @property
    def pruning_ratio(self) -> float:
        return getattr(self.config, "pruning_ratio", 0.0)

    @abc.abstractmethod
    def prepare(self, model: nn.Module, calibration: Calibration) -> None:
        """Calibrate or prune; called once before evaluation."""

    def reset(self) -> None:
        """Return to the just-prepared state before an evaluation pass."""

    @abc.abstractmethod
    def forward(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the logits of one batch."""

    def batch_flops(self, model: nn.Module, batch: int, length: int) -> int:
        """Return the FLOPs of the last :meth:`forward`, probe included."""
        return dense_model_flops(model.config, batch, length)

    def probe_flops(self) -> int:
        """Return the probe's FLOPs in the last :meth:`forward` (0 without a probe)."""
        return 0

    def probe_seconds(self) -> float:
        """Return the probe's wall time in the last :meth:`forward` (0 without a probe)."""
        return 0.0


class DenseConfig(BaseModel):
    """The unpruned model."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Literal["dense"] = "dense"
    label: str | None = Field(None, description="name shown in result tables instead of the method name")


class DenseMethod(PruningMethod):
    name = "dense"

    def prepare(self, model: nn.Module, calibration: Calibration) -> None:
        pass

    def forward(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids, use_cache=False).logits


class ProbeMethodConfig(ProbePruningConfig):
    """Probe Pruning (``probe``) with every :class:`ProbePruningConfig` setting."""

    name: Literal["probe"] = "probe"


class FullBatchProbeConfig(ProbePruningConfig):
    """Full-batch probing: the probe is the whole batch and no history is used."""

    name: Literal["full-batch-probe"] = "full-batch-probe"
    full_batch: Literal[True] = True
    history: HistoryConfig = Field(default_factory=lambda: HistoryConfig(enabled=False, update="none"))


class ProbeMethod(PruningMethod):
    """Probe Pruning through :class:`ProbePruner`, attached for each batch."""

    name = "probe"

    def __init__(self, config: ProbePruningConfig):
        super().__init__(config)
        self.pruner: ProbePruner | None = None
        self._before = (0, 0, 0, 0.0)

    def _pruner_config(self) -> ProbePruningConfig:
        fields = self.config.model_dump(exclude={"name"})
        return ProbePruningConfig(**fields)

    def prepare(self, model: nn.Module, calibration: Calibration) -> None:
        config = self._pruner_config()
        self.pruner = ProbePruner(model, config)
        if config.history.enabled and not config.full_batch:
            self.pruner.set_history(calibration.history(model, self.pruner))

    def reset(self) -> None:
        self.pruner.reset_history()
        self.pruner.counters.reset()

    def forward(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        counters = self.pruner.counters
        self._before = (counters.dense_flops, counters.kept_flops, counters.probe_flops, counters.probe_seconds)
        with self.pruner.attached():
            return model(input_ids, use_cache=False).logits

    def batch_flops(self, model: nn.Module, batch: int, length: int) -> int:
        counters = self.pruner.counters
        dense_part = counters.dense_flops - self._before[0]
        kept_part = counters.kept_flops - self._before[1]
        return dense_model_flops(model.config, batch, length) - dense_part + kept_part + self.probe_flops()

    def probe_flops(self) -> int:
        return self.pruner.counters.probe_flops - self._before[2]

    def probe_seconds(self) -> float:
        return self.pruner.counters.probe_seconds - self._before[3]


class FullBatchProbeMethod(ProbeMethod):
    """Full-batch probing, the quality upper bound of probing."""

    name = "full-batch-probe"


class StaticConfig(StructureConfig):
    """Settings shared by the static baselines: what is pruned and how much."""


class StaticMethod(PruningMethod):
    """A baseline that prunes once and evaluates the physically smaller model.

    The dense model is copied and the copy is shrunk with torch-pruning's
    pruning functions (:func:`pp_plugin.static.apply_decisions`), so its latency
    is that of a real smaller model.
    """

    def __init__(self, config: StaticConfig):
        super().__init__(config)
        self.pruned_model: nn.Module | None = None

    @abc.abstractmethod
    def decide(
        self, pruner: ProbePruner, calibration: Calibration
    ) -> tuple[dict[int, LayerDecision], dict | None]:
        """Return the keep-set of every pruned layer and optional bias compensation."""

    def prepare(self, model: nn.Module, calibration: Calibration) -> None:
        structure = StructureConfig(**self.config.model_dump(include=set(StructureConfig.model_fields)))
        pruner = ProbePruner(
            model, ProbePruningConfig(**structure.model_dump(), history=HistoryConfig(enabled=False))
        )
        decisions, compensation = self.decide(pruner, calibration)
        self.pruned_model = copy.deepcopy(model)
        groups = [
            dataclasses.replace(group, layer=self.pruned_model.model.layers[group.layer_index])
            for group in pruner.groups
        ]
        apply_decisions(self.pruned_model, groups, decisions, compensation)

    def forward(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return self.pruned_model(input_ids, use_cache=False).logits

    def batch_flops(self, model: nn.Module, batch: int, length: int) -> int:
        return model_flops(self.pruned_model, batch, length)


class RandomConfig(StaticConfig):
    """Uniformly random heads and channels, one seeded keep-set per layer: the floor to beat."""

    name: Literal["random"] = "random"
    seed: int = Field(0, description="seed of the random keep-sets")


class RandomMethod(StaticMethod):
    name = "random"

    def decide(self, pruner: ProbePruner, calibration: Calibration):
        return pruner.random_decisions(self.config.seed), None


class WandaSpConfig(StaticConfig):
    """Wanda-sp: ``sum_i |W_ij| * sqrt(mean x_j**2)`` from calibration, uniform ratio, no bias."""

    name: Literal["wanda-sp"] = "wanda-sp"


class WandaSpMethod(StaticMethod):
    name = "wanda-sp"

    def decide(self, pruner: ProbePruner, calibration: Calibration):
        scores = wanda_sp_scores(pruner, calibration.history(pruner.model, pruner))
        return uniform_decisions(pruner, scores), None


class FlapConfig(StaticConfig):
    """FLAP: fluctuation score, per-layer standardisation, one global threshold, bias compensation."""

    name: Literal["flap"] = "flap"
    bias_compensation: bool = Field(True, description="add the pruned channels' mean output to the bias")


class FlapMethod(StaticMethod):
    name = "flap"

    def decide(self, pruner: ProbePruner, calibration: Calibration):
        decisions, compensation = flap_decisions(pruner, calibration.history(pruner.model, pruner))
        return decisions, compensation if self.config.bias_compensation else None


class MagnitudeConfig(StaticConfig):
    """torch-pruning's GroupMagnitudeImportance (L2 over each coupled group), uniform ratio."""

    name: Literal["magnitude"] = "magnitude"


class MagnitudeMethod(StaticMethod):
    name = "magnitude"

    def decide(self, pruner: ProbePruner, calibration: Calibration):
        return uniform_decisions(pruner, magnitude_scores(pruner)), None


class TaylorConfig(StaticConfig):
    """torch-pruning's GroupTaylorImportance with gradients of the calibration loss, uniform ratio."""

    name: Literal["taylor"] = "taylor"
    gradient_batches: int = Field(4, ge=1, description="calibration batches whose loss gradients are summed")


class TaylorMethod(StaticMethod):
    name = "taylor"

    def decide(self, pruner: ProbePruner, calibration: Calibration):
        scores = taylor_scores(pruner, calibration.windows, calibration.batch_size, self.config.gradient_batches)
        return uniform_decisions(pruner, scores), None


class ProbeSnapshotConfig(StaticConfig):
    """The PP score on calibration history alone: one static keep-set per layer, no probe."""

    name: Literal["probe-snapshot"] = "probe-snapshot"


class ProbeSnapshotMethod(StaticMethod):
    name = "probe-snapshot"

    def decide(self, pruner: ProbePruner, calibration: Calibration):
        scores = probe_snapshot_scores(pruner, calibration.history(pruner.model, pruner))
        return uniform_decisions(pruner, scores), None


#: Method name to (recipe configuration class, implementation class).
METHODS: dict[str, tuple[type[BaseModel], type[PruningMethod]]] = {
    "dense": (DenseConfig, DenseMethod),
    "probe": (ProbeMethodConfig, ProbeMethod),
    "full-batch-probe": (FullBatchProbeConfig, FullBatchProbeMethod),
    "random": (RandomConfig, RandomMethod),
    "probe-snapshot": (ProbeSnapshotConfig, ProbeSnapshotMethod),
    "wanda-sp": (WandaSpConfig, WandaSpMethod),
    "flap": (FlapConfig, FlapMethod),
    "magnitude": (MagnitudeConfig, MagnitudeMethod),
    "taylor": (TaylorConfig, TaylorMethod),
}


def create_method(config: BaseModel | dict) -> PruningMethod:
    """Build the method named by ``config.name`` (a validated config or a plain dict)."""
    name = config["name"] if isinstance(config, dict) else config.name
    if name not in METHODS:
        raise RecipeError(
            f"unknown method name {name!r}; valid names are: {', '.join(sorted(METHODS))}."
        )
    config_class, method_class = METHODS[name]
    if isinstance(config, dict):
        config = config_class(**config)
    return method_class(config)
