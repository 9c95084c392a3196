"""``pp-prune compare``: every method at every ratio on the same calibration data and test windows.

Calibration history is collected once and shared. For each pruning ratio the
dense model and all methods run side by side on the same batches (see
:mod:`pp_plugin.evaluation`), so latency ratios come from one interleaved run.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RecipeError
from .evaluation import MethodResult
from .experiment import open_workspace, run_methods
from .methods import create_method
from .recipe import Recipe
from .tables import render_table

logger = logging.getLogger(__name__)

#: Two-sided 95% quantiles of Student's t distribution by degrees of freedom (standard tables).
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 60: 2.000, 120: 1.980}


def t_quantile_95(degrees_of_freedom: int) -> float:
    """Return the two-sided 95% t quantile for the largest tabulated degrees of freedom not above the given.

    Rounding the degrees of freedom down gives a slightly wider, conservative interval.
    """
    below = [tabulated for tabulated in T_95 if tabulated <= degrees_of_freedom]
    return T_95[max(below)] if below else T_95[1]


@dataclass
class ComparisonRow:
    """One method at one ratio, with spread and cost relative to dense.

    ``perplexity_ci95`` is a 95% t interval of the perplexity from the spread
    of per-window log-perplexities (per-batch ones when windows are missing).
    ``ratio_to_dense_ci95`` is the same interval for ``perplexity / dense
    perplexity``, paired window by window, so each window's difficulty cancels
    out. ``perplexity_std`` is the standard deviation of per-window perplexities.
    ``prr`` is ``(ppl - ppl_dense) / (1 - latency_ratio)``, None when latency does not drop.
    """

    method: str
    pruning_ratio: float
    perplexity: float | None
    perplexity_std: float | None
    perplexity_ci95: list[float] | None
    perplexity_increase: float | None
    ratio_to_dense_ci95: list[float] | None
    latency_ms: float | None
    latency_ratio: float | None
    flops_ratio: float | None
    prr: float | None
    probe_flops_share: float | None
    probe_time_share: float | None
    tokens: int
    window_perplexities: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class ComparisonReport:
    """All rows of one comparison, with the model and data they were measured on."""

    model: str
    data: dict
    rows: list[ComparisonRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Return the JSON layout written by ``pp-prune compare --json``."""
        return {"model": self.model, "data": self.data, "results": [vars(row) for row in self.rows]}


def _log_interval(values: list[float]) -> list[float] | None:
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half_width = t_quantile_95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return [math.exp(mean - half_width), math.exp(mean + half_width)]


def summarise_row(result: MethodResult, dense: MethodResult | None) -> ComparisonRow:
    """Return the comparison row of ``result``, with spread and costs relative to ``dense``."""
    ok = result.error is None and result.tokens > 0
    samples = (result.window_perplexities or result.batch_perplexities) if ok else []
    logs = [math.log(value) for value in samples]
    dense_ok = dense is not None and dense.error is None and dense.tokens > 0
    paired = None
    dense_samples = (dense.window_perplexities or dense.batch_perplexities) if dense_ok else []
    if ok and dense_ok and len(dense_samples) == len(samples):
        paired = _log_interval([math.log(a) - math.log(b) for a, b in zip(samples, dense_samples)])

    increase = result.perplexity - dense.perplexity if ok and dense_ok else None
    prr = None
    if increase is not None and result.latency_ratio is not None and result.latency_ratio < 1:
        prr = increase / (1 - result.latency_ratio)

    return ComparisonRow(
        method=result.method,
        pruning_ratio=result.pruning_ratio,
        perplexity=result.perplexity if ok else None,
        perplexity_std=statistics.stdev(samples) if len(samples) > 1 else None,
        perplexity_ci95=_log_interval(logs),
        perplexity_increase=increase,
        ratio_to_dense_ci95=paired,
        latency_ms=result.latency_ms if ok else None,
        latency_ratio=result.latency_ratio if ok else None,
        flops_ratio=result.flops_ratio if ok else None,
        prr=prr,
        probe_flops_share=result.probe_flops_share,
        probe_time_share=result.probe_time_share,
        tokens=result.tokens,
        window_perplexities=samples,
        error=result.error,
    )


def run_comparison(recipe: Recipe) -> ComparisonReport:
    """Evaluate every method of ``recipe.compare`` at every ratio on the same windows.

    A method that fails is reported with its error in its row; the others still run.
    """
    if recipe.compare is None:
        raise RecipeError(
            "recipe has no compare section; add compare.methods and compare.pruning_ratios "
            "(see recipes/smollm2-compare.yaml)."
        )
    configs = [config for config in recipe.compare.methods if config.name != "dense"]
    rows: list[ComparisonRow] = []
    report = None
    workspace = open_workspace(recipe)
    for index, ratio in enumerate(recipe.compare.pruning_ratios):
        methods = [create_method({"name": "dense"})]
        methods += [create_method(config.model_copy(update={"pruning_ratio": ratio})) for config in configs]
        logger.info("comparing %d methods at pruning ratio %.2f", len(methods) - 1, ratio)
        report = run_methods(recipe, methods, workspace)
        dense = report.results[0]
        start = 0 if index == 0 else 1  # dense is listed once, from the first ratio
        rows += [summarise_row(result, dense) for result in report.results[start:]]
    return ComparisonReport(model=recipe.model, data=report.data, rows=rows)


COLUMNS = (
    ("method", "method", "{}"),
    ("pruning_ratio", "ratio", "{:.2f}"),
    ("perplexity", "ppl", "{:.2f}"),
    ("perplexity_ci95", "ppl 95% CI", "{0[0]:.1f}-{0[1]:.1f}"),
    ("perplexity_increase", "ppl increase", "{:+.2f}"),
    ("ratio_to_dense_ci95", "ppl/dense 95% CI", "{0[0]:.2f}-{0[1]:.2f}"),
    ("latency_ratio", "latency ratio", "{:.3f}"),
    ("flops_ratio", "FLOPs ratio", "{:.3f}"),
    ("prr", "PRR", "{:.1f}"),
    ("probe_flops_share", "probe FLOPs", "{:.3f}"),
    ("probe_time_share", "probe time", "{:.3f}"),
)


def format_comparison(report: ComparisonReport) -> str:
    """Return the rows as an aligned plain-text table, with failed methods below it."""
    failures = [f"{row.method} at {row.pruning_ratio:.2f}: failed: {row.error}" for row in report.rows if row.error]
    return render_table(report.rows, COLUMNS, failures)


def plot_comparison(report: ComparisonReport, path: Path) -> None:
    """Write a PNG of perplexity against latency ratio: one marker per method, one point per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "o^svD<>pP*Xh"
    figure, axes = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(row.method for row in report.rows))
    for number, method in enumerate(methods):
        points = sorted(
            (row.latency_ratio, row.perplexity, row.pruning_ratio)
            for row in report.rows
            if row.method == method and row.perplexity is not None and row.latency_ratio is not None
        )
        if not points:
            continue
        axes.plot([p[0] for p in points], [p[1] for p in points], marker=markers[number % len(markers)],
                  label=method, linestyle="-" if len(points) > 1 else "none")
        for latency, perplexity, ratio in points:
            if method != "dense":
                axes.annotate(f"{ratio:.1f}", (latency, perplexity), textcoords="offset points", xytext=(4, 4),
                              fontsize=7)
    axes.set_yscale("log")
    axes.set_xlabel("latency ratio to dense (lower is faster)")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title(f"{report.model} on {report.data.get('dataset')} {report.data.get('test_split')}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
