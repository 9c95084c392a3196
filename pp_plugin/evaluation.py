"""Perplexity, latency and FLOPs of several methods on the same test windows.

Methods run side by side: for every test batch, each method runs in turn, so
all of them see the same windows and the same machine load. Latency is the
median wall time of one batch's forward pass (probe and weight gathering
included). FLOPs are analytic (see :mod:`pp_plugin.flops`).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import PPPluginError
from .flops import dense_model_flops
from .methods import Calibration, PruningMethod

logger = logging.getLogger(__name__)


@dataclass
class MethodResult:
    """Measurements of one method on the test windows.

    Ratios are relative to the ``dense`` method of the same run (None without
    one). ``batch_perplexities`` and ``window_perplexities`` contain one
    perplexity per test batch and per test window, for spread.
    """

    method: str
    pruning_ratio: float
    perplexity: float = math.nan
    latency_ms: float = math.nan
    latency_ratio: float | None = None
    flops_ratio: float | None = None
    tokens: int = 0
    probe_flops_share: float | None = None
    probe_time_share: float | None = None
    batch_perplexities: list[float] = field(default_factory=list)
    window_perplexities: list[float] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        """Return a JSON-serialisable dict (NaN becomes None)."""
        return {
            key: (None if isinstance(value, float) and math.isnan(value) else value)
            for key, value in asdict(self).items()
        }


@dataclass
class _Tally:
    negative_log_likelihood: float = 0.0
    tokens: int = 0
    flops: int = 0
    dense_flops: int = 0
    probe_flops: int = 0
    probe_seconds: float = 0.0
    seconds: list[float] = field(default_factory=list)
    batch_perplexities: list[float] = field(default_factory=list)
    window_perplexities: list[float] = field(default_factory=list)
    error: str | None = None


def window_negative_log_likelihoods(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Return the ``[B]`` summed next-token NLL (nats) of each window of a batch."""
    predictions = logits[:, :-1].float()
    targets = input_ids[:, 1:].to(predictions.device)
    losses = F.cross_entropy(predictions.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(targets.shape).sum(dim=1)


def batch_negative_log_likelihood(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Return the summed next-token NLL (nats) of a batch and the number of predicted tokens."""
    windows = window_negative_log_likelihoods(logits, input_ids)
    return float(windows.sum()), windows.numel() * (input_ids.shape[1] - 1)


def _run_batch(method: PruningMethod, model: nn.Module, batch: torch.Tensor, tally: _Tally) -> None:
    started = time.perf_counter()
    logits = method.forward(model, batch)
    tally.seconds.append(time.perf_counter() - started)
    windows = window_negative_log_likelihoods(logits, batch)
    predicted_per_window = batch.shape[1] - 1
    nll, tokens = float(windows.sum()), windows.numel() * predicted_per_window
    tally.window_perplexities += [math.exp(value / predicted_per_window) for value in windows.tolist()]
    tally.negative_log_likelihood += nll
    tally.tokens += tokens
    tally.batch_perplexities.append(math.exp(nll / tokens))
    tally.flops += method.batch_flops(model, batch.shape[0], batch.shape[1])
    tally.dense_flops += dense_model_flops(model.config, batch.shape[0], batch.shape[1])
    tally.probe_flops += method.probe_flops()
    tally.probe_seconds += method.probe_seconds()


@torch.no_grad()
def evaluate_methods(
    model: nn.Module,
    methods: list[PruningMethod],
    calibration: Calibration,
    test_windows: torch.Tensor,
    batch_size: int,
) -> list[MethodResult]:
    """Prepare every method, then measure all of them on the same test batches.

    A method that raises while preparing or running is reported with its error
    in ``MethodResult.error``; the other methods still run.

    Args:
        model: the dense causal LM; methods attach to it or copy it.
        methods: methods to compare; include ``dense`` to get ratios.
        calibration: calibration data shared by all methods.
        test_windows: ``[N, T]`` token ids without padding.
        batch_size: windows per forward pass.
    """
    if test_windows.ndim != 2 or test_windows.shape[0] == 0:
        raise PPPluginError(
            f"evaluation needs a non-empty [N, T] tensor of test windows, got shape "
            f"{tuple(test_windows.shape)}; raise data.test_windows or supply more test text."
        )
    device = next(model.parameters()).device
    tallies = {id(method): _Tally() for method in methods}
    for method in methods:
        try:
            method.prepare(model, calibration)
        except PPPluginError:
            raise  # invalid settings, models or caches: the user must act, so the run stops
        except Exception as error:  # reported in the method's row; the run goes on
            logger.exception("method %s failed while preparing", method.name)
            tallies[id(method)].error = f"{type(error).__name__}: {error}"

    batches = [test_windows[i:i + batch_size].to(device) for i in range(0, test_windows.shape[0], batch_size)]
    live = [method for method in methods if tallies[id(method)].error is None]
    # One untimed pass per method warms caches and allocators, then each method
    # is reset so the warm-up batch leaves no trace in its state.
    for method in list(live):
        try:
            method.forward(model, batches[0])
            method.reset()
        except Exception as error:
            logger.exception("method %s failed on the warm-up batch", method.name)
            tallies[id(method)].error = f"{type(error).__name__}: {error}"
            live.remove(method)

    for batch in tqdm(batches, desc="evaluation", unit="batch"):
        for method in list(live):
            try:
                _run_batch(method, model, batch, tallies[id(method)])
            except Exception as error:
                logger.exception("method %s failed during evaluation", method.name)
                tallies[id(method)].error = f"{type(error).__name__}: {error}"
                live.remove(method)

    return _summarise(methods, tallies)


def _summarise(methods: list[PruningMethod], tallies: dict[int, _Tally]) -> list[MethodResult]:
    dense = next((tallies[id(m)] for m in methods if m.name == "dense" and tallies[id(m)].error is None), None)
    dense_latency = statistics.median(dense.seconds) if dense and dense.seconds else None
    results = []
    for method in methods:
        tally = tallies[id(method)]
        result = MethodResult(method=method.label, pruning_ratio=method.pruning_ratio, error=tally.error)
        if tally.error is None and tally.tokens:
            latency = statistics.median(tally.seconds)
            result.perplexity = math.exp(tally.negative_log_likelihood / tally.tokens)
            result.latency_ms = 1000 * latency
            result.latency_ratio = latency / dense_latency if dense_latency else None
            result.flops_ratio = tally.flops / tally.dense_flops
            result.tokens = tally.tokens
            result.batch_perplexities = tally.batch_perplexities
            result.window_perplexities = tally.window_perplexities
            if tally.probe_flops:
                result.probe_flops_share = tally.probe_flops / tally.flops
                result.probe_time_share = tally.probe_seconds / sum(tally.seconds)
        results.append(result)
    return results
