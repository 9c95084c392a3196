"""Repeat `pp-prune eval` on one recipe and report medians over the repeats.

Each repeat evaluates the dense model and the recipe's method side by side on
the same batches (see pp_plugin.evaluation). This script runs several repeats
in one process and prints a Markdown table of the medians, for docs/benchmarks.md.

    python benchmarks/eval_latency.py recipes/smollm2-probe.yaml --repeats 3 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

import torch

from pp_plugin.experiment import run_evaluation
from pp_plugin.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--repeats", type=int, default=3, help="number of evaluation runs (default 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    recipe = load_recipe(args.recipe, args.overrides)
    runs = []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        report = run_evaluation(recipe)
        logging.warning("repeat %d took %.0f s", repeat + 1, time.perf_counter() - started)
        runs.append(report.results)

    print(f"recipe: {args.recipe} {' '.join('--set ' + o for o in args.overrides)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; {args.repeats} repeats")
    print()
    print("| method | ratio | perplexity | latency_ms (median) | latency_ratio (median, min-max) "
          "| flops_ratio | probe FLOPs share | probe time share |")
    print("|---|---|---|---|---|---|---|---|")
    for index, first in enumerate(runs[0]):
        rows = [run[index] for run in runs]
        ratios = [row.latency_ratio for row in rows if row.latency_ratio is not None]
        probe_time = [row.probe_time_share for row in rows if row.probe_time_share is not None]
        print(
            f"| {first.method} | {first.pruning_ratio:.2f} | {first.perplexity:.2f} "
            f"| {statistics.median(row.latency_ms for row in rows):.0f} "
            f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
            f"| {first.flops_ratio:.3f} "
            f"| {'-' if first.probe_flops_share is None else f'{first.probe_flops_share:.3f}'} "
            f"| {'-' if not probe_time else f'{statistics.median(probe_time):.3f}'} |"
        )


if __name__ == "__main__":
    main()
