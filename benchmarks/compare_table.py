"""Turn the JSON of `pp-prune compare --json` into Markdown tables for docs/benchmarks.md.

    python benchmarks/compare_table.py compare.json [--reference probe]

The first table has the rows as `pp-prune compare` prints them. The second
compares every method with a reference method at the same ratio, paired window
by window: the 95% t interval of perplexity / reference perplexity.
"""

from __future__ import annotations

import argparse
import json
import math

from pp_plugin.comparison import _log_interval


def _format(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path")
    parser.add_argument("--reference", default="probe", help="method label to pair against (default: probe)")
    args = parser.parse_args()
    rows = json.load(open(args.json_path, encoding="utf-8"))["results"]

    print("| method | ratio | perplexity (95% CI) | ppl / dense (paired 95% CI) | latency ratio | FLOPs ratio "
          "| PRR | probe FLOPs share | probe time share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["error"]:
            print(f"| {row['method']} | {row['pruning_ratio']:.2f} | failed: {row['error']} | | | | | | |")
            continue
        low, high = row["perplexity_ci95"] or (None, None)
        ratio = row["ratio_to_dense_ci95"]
        print(
            f"| {row['method']} | {row['pruning_ratio']:.2f} "
            f"| {row['perplexity']:.2f} ({_format(low, '{:.1f}')}-{_format(high, '{:.1f}')}) "
            f"| {row['perplexity'] / rows[0]['perplexity']:.3f} "
            f"({_format(ratio and ratio[0], '{:.3f}')}-{_format(ratio and ratio[1], '{:.3f}')}) "
            f"| {_format(row['latency_ratio'], '{:.3f}')} | {_format(row['flops_ratio'], '{:.3f}')} "
            f"| {_format(row['prr'], '{:.1f}')} | {_format(row['probe_flops_share'], '{:.3f}')} "
            f"| {_format(row['probe_time_share'], '{:.3f}')} |"
        )

    print()
    print(f"| method | ratio | perplexity / {args.reference} (paired 95% CI over windows) |")
    print("|---|---|---|")
    for row in rows:
        reference = next(
            (r for r in rows if r["method"] == args.reference and r["pruning_ratio"] == row["pruning_ratio"]), None
        )
        if reference is None or row is reference or row["error"] or not row["window_perplexities"]:
            continue
        differences = [
            math.log(a) - math.log(b) for a, b in zip(row["window_perplexities"], reference["window_perplexities"])
        ]
        low, high = _log_interval(differences)
        mean = math.exp(sum(differences) / len(differences))
        print(f"| {row['method']} | {row['pruning_ratio']:.2f} | {mean:.3f} ({low:.3f}-{high:.3f}) |")


if __name__ == "__main__":
    main()
