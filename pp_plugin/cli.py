"""The ``pp-prune`` command line.

``pp-prune eval RECIPE [--set KEY=VALUE ...] [--json PATH]`` evaluates the dense
model and the recipe's method on the same test windows and prints a table.
``pp-prune compare RECIPE [--set ...] [--json PATH] [--plot PATH]`` evaluates
every method of the recipe's compare section at every ratio on the same windows.
``pp-prune apply RECIPE --output DIR [--force]`` prunes with the recipe's static
method and saves the smaller model. ``pp-prune fetch [--model NAME] [--data NAME]``
downloads and converts the embedded model and data into the cache ahead of time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .cache import atomic_write_text
from .data import load_text
from .comparison import format_comparison, plot_comparison, run_comparison
from .errors import PPPluginError, RecipeError
from .experiment import Report, open_workspace, run_evaluation
from .methods import METHODS, StaticMethod, create_method
from .models import ensure_embedded_model
from .static import check_output_dir, save_pruned
from .tables import render_table
from .recipe import load_recipe

logger = logging.getLogger(__name__)

TABLE_COLUMNS = (
    ("method", "method", "{}"),
    ("pruning_ratio", "ratio", "{:.2f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("latency_ms", "latency_ms", "{:.0f}"),
    ("latency_ratio", "latency_ratio", "{:.3f}"),
    ("flops_ratio", "flops_ratio", "{:.3f}"),
)


def format_table(report: Report) -> str:
    """Return the results as an aligned plain-text table, with errors below it."""
    failures = [
        f"{result.method} at {result.pruning_ratio}: failed: {result.error}" for result in report.results if result.error
    ]
    return render_table(report.results, TABLE_COLUMNS, failures)


def _check_output_path(path: Path | None, force: bool) -> None:
    if path is not None and path.is_dir():
        raise PPPluginError(f"{path} is a folder; pass a file path for the output.")
    if path is not None and path.exists() and not force:
        raise PPPluginError(f"{path} already exists; choose another path or pass --force to overwrite it.")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pp-prune", description="Probe Pruning for Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser(
        "eval", help="evaluate the dense model and the recipe's method on the same test windows"
    )
    compare = commands.add_parser(
        "compare", help="evaluate every method of the recipe's compare section at every ratio"
    )
    apply = commands.add_parser("apply", help="prune with the recipe's static method and save the smaller model")
    for command in (evaluate, compare, apply):
        command.add_argument("recipe", type=Path, help="YAML recipe, e.g. recipes/smollm2-probe.yaml")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a recipe key by its dotted path, e.g. --set data.test_windows=8 (repeatable)",
        )
    for command in (evaluate, compare):
        command.add_argument("--json", type=Path, help="also write the results as JSON to this file")
        command.add_argument("--force", action="store_true", help="overwrite existing output files")
    compare.add_argument("--plot", type=Path, help="also draw perplexity against latency ratio into this PNG")
    apply.add_argument("--output", type=Path, required=True, help="folder for the pruned model")
    apply.add_argument("--force", action="store_true", help="write into a non-empty --output folder")

    fetch = commands.add_parser("fetch", help="download and convert the embedded model and data into the cache")
    fetch.add_argument("--model", default="smollm2-135m", help="embedded model name (default: smollm2-135m)")
    fetch.add_argument("--data", default="brown", help="data set name (default: brown)")
    return parser


def _fetch(model: str, data: str) -> None:
    folder = ensure_embedded_model(model)
    for split in ("calibration", "test"):
        load_text(data, split)
    logger.info("model %s is in %s; data %s is cached", model, folder, data)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "fetch":
            _fetch(args.model, args.data)
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "apply":
            _apply(recipe, args.output, args.force)
            return 0
        for path in (args.json, getattr(args, "plot", None)):
            _check_output_path(path, args.force)
        if args.command == "compare":
            return _compare(recipe, args.json, args.plot)
        report = run_evaluation(recipe)
    except PPPluginError as error:
        print(f"pp-prune: error: {error}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
        logger.info("wrote %s", args.json)
    failed = any(result.error for result in report.results)
    return 1 if failed else 0


def _compare(recipe, json_path: Path | None, plot_path: Path | None) -> int:
    report = run_comparison(recipe)
    print(format_comparison(report))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
        logger.info("wrote %s", json_path)
    if plot_path is not None:
        plot_comparison(report, plot_path)
        logger.info("wrote %s", plot_path)
    return 1 if any(row.error for row in report.rows) else 0


def _apply(recipe, output: Path, force: bool) -> None:
    method = create_method(recipe.method)
    if not isinstance(method, StaticMethod):
        static_names = sorted(name for name, (_, cls) in METHODS.items() if issubclass(cls, StaticMethod))
        raise RecipeError(
            f"method {recipe.method.name!r} has no single pruned model to save (dense prunes nothing, "
            f"probe and full-batch-probe prune per batch); "
            f"set method.name to a static method: {', '.join(static_names)}."
        )
    check_output_dir(output, force)
    workspace = open_workspace(recipe)
    method.prepare(workspace.model, workspace.calibration)
    save_pruned(method.pruned_model, workspace.tokenizer, output, force=force)
    logger.info("saved the model pruned by %s at ratio %.2f to %s", method.name, method.pruning_ratio, output)


if __name__ == "__main__":
    sys.exit(main())
