"""The demo's report: per-run records, means and spreads over the seeds, the printed tables, the verdict, the figure.

Plain Python on the records ``lightning_heavytail.demo`` collects (matplotlib is imported only to draw), so the
tables and the verdict can be checked on hand-made numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_heavytail._plotting import label_sparsity_axis, sparsity_axis
from lightning_heavytail.cli import DEMO_SPARSITIES, EPSILON
from lightning_heavytail.pruning.curve import level_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["RUN_NAMES", "mean_run", "plot", "run_record", "spread", "summarize", "tables", "tail_index", "verdict"]

RUN_NAMES = ("vanilla", "heavytail")
HELD_POINTS = 2.0
""""Accuracy held at the epsilon point": no seed loses more (in accuracy points)."""


def run_record(entry: dict[str, Any], seed: int, log_dir: str, train_accuracy: float, stop_at: float,
                point: dict[str, Any]) -> dict[str, Any]:
    """One seed's run: the final pruning evaluation, the epsilon point, how training ended."""
    curve, global_curve, report = entry["curves"]["neuron"], entry["curves"]["global"], entry["compressibility"]
    compress = {
        "fraction_prunable": report["fraction_prunable/total"],
        "epsilon": EPSILON,
        **{key[: -len("/total")]: value for key, value in report.items() if key.endswith("/total") and
           not key.startswith("fraction_prunable")},
        **{key[: -len("/mean")]: value for key, value in report.items() if key.endswith("/mean")},
    }
    return {
        "seed": seed,
        "log_dir": log_dir,
        "epoch": entry["epoch"],
        "global_step": entry["global_step"],
        "train_accuracy": train_accuracy,
        "reached_stop": train_accuracy > stop_at,
        "requested": curve["requested"],
        "sparsity": curve["sparsities"],
        "accuracy": curve["metrics"]["accuracy"],
        "auc": entry["auc"]["neuron"],
        "global": {
            "requested": global_curve["requested"],
            "sparsity": global_curve["sparsities"],
            "accuracy": global_curve["metrics"]["accuracy"],
            "auc": entry["auc"]["global"],
        },
        "compressibility": compress,
        "epsilon_point": point,
    }


# ---------------------------------------------------------------------- summaries


def spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}``; ``std`` is the sample standard deviation over the seeds (0 for one seed)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def mean_run(name: str, runs: list[dict[str, Any]], noise: dict[str, Any] | None) -> dict[str, Any]:
    """The top-level entry of one run kind: curves and compressibility as means over the seeds, and every seed."""

    def mean_lists(lists: list[list[float]]) -> list[float]:
        return [statistics.fmean(column) for column in zip(*lists, strict=True)]

    return {
        "name": name,
        "method": "neuron",
        "seeds": [run["seed"] for run in runs],
        "requested": runs[0]["requested"],
        "sparsity": mean_lists([run["sparsity"] for run in runs]),
        "accuracy": mean_lists([run["accuracy"] for run in runs]),
        "auc": statistics.fmean(run["auc"] for run in runs),
        "global": {
            "requested": runs[0]["global"]["requested"],
            "sparsity": mean_lists([run["global"]["sparsity"] for run in runs]),
            "accuracy": mean_lists([run["global"]["accuracy"] for run in runs]),
            "auc": statistics.fmean(run["global"]["auc"] for run in runs),
        },
        "compressibility": {key: statistics.fmean(run["compressibility"][key] for run in runs)
                            for key in runs[0]["compressibility"]},
        "noise": noise,
        "runs": runs,
    }


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name in RUN_NAMES:
        runs = results[name]["runs"]
        summary[name] = {
            "accuracy": spread([run["accuracy"][0] for run in runs]),  # level 0.0: unpruned
            "epsilon_ratio": spread([run["epsilon_point"]["ratio"] for run in runs]),
            "epsilon_accuracy": spread([run["epsilon_point"]["metrics"]["accuracy"] for run in runs]),
            "steps": spread([run["global_step"] for run in runs]),
        }
    summary["vanilla"]["accuracy_at_heavytail_ratio"] = spread(
        [run["accuracy_at_heavytail_ratio"] for run in results["vanilla"]["runs"]]
    )
    return summary


def _pm(stat: dict[str, Any], digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


TAIL_INDEX_NOTE = (
    "alpha: tail index of the hidden units' weights (2: Gaussian, smaller: heavier tails). Mohammadi's estimate is\n"
    "clipped to (0, 2]; Hill's is not: above 2 it means tails lighter than any stable law's (shown as > 2, with\n"
    "the estimate), and near 2 it is biased upwards."
)


def tail_index(value: float) -> str:
    """A tail-index estimate as printed: above 2 (Hill's, unclipped) it reads ``> 2 (estimate)``, not a bare number.

    Examples:
        >>> tail_index(1.7092), tail_index(44.25), tail_index(float("nan"))
        ('1.7092', '> 2 (44.25)', 'nan')
    """
    return f"> 2 ({value:.2f})" if value > 2.0 else f"{value:.4f}"


def tables(results: dict[str, Any]) -> str:
    """The tables printed by the demo: the epsilon point, the mean pruning curve, the compressibility metrics."""
    van, ht, summary = results["vanilla"], results["heavytail"], results["summary"]
    seeds = ", ".join(str(s) for s in van["seeds"])
    col = 17
    lines = [
        f"the paper's measurement, epsilon {EPSILON}: mean ± sd over {len(van['seeds'])} seed(s) ({seeds})",
        f"{'':>40} | {'vanilla':>{col}} | {'heavytail':>{col}}",
        f"{'-' * 40}-+-{'-' * col}-+-{'-' * col}",
    ]
    rows = [("test accuracy, unpruned", "accuracy", 4), ("epsilon ratio (hidden units pruned)", "epsilon_ratio", 4),
            ("test accuracy at the epsilon point", "epsilon_accuracy", 4), ("training steps", "steps", 1)]
    for label, key, digits in rows:
        lines.append(f"{label:>40} | {_pm(summary['vanilla'][key], digits):>{col}} |"
                     f" {_pm(summary['heavytail'][key], digits):>{col}}")
    lines.append(f"{'vanilla pruned to the heavytail ratio':>40} |"
                 f" {_pm(summary['vanilla']['accuracy_at_heavytail_ratio']):>{col}} | {'':>{col}}")
    lines += [
        "",
        "test accuracy under neuron pruning at fixed sparsities (mean over the seeds)",
        f"{'sparsity':>10} | {'vanilla':>9} | {'heavytail':>9} | {'difference':>10}",
        f"{'-' * 10}-+-{'-' * 9}-+-{'-' * 9}-+-{'-' * 10}",
    ]
    for level, a, b in zip(van["requested"], van["accuracy"], ht["accuracy"], strict=True):
        lines.append(f"{level_label(level):>10} | {a:>9.4f} | {b:>9.4f} | {b - a:>+10.4f}")
    lines += [
        "",
        "compressibility of the hidden layer (mean over the seeds)",
        f"{'metric':>27} | {'vanilla':>11} | {'heavytail':>11}",
        f"{'-' * 27}-+-{'-' * 11}-+-{'-' * 11}",
    ]
    metrics = [("fraction prunable (eps 0.1)", "fraction_prunable")]
    metrics += [(f"best-k error {label}", f"best_k_error@{label}") for label in map(level_label, (0.9, 0.99))
                if f"best_k_error@{label}" in van["compressibility"]]
    for label, key in metrics:
        lines.append(f"{label:>27} | {van['compressibility'][key]:>11.4f} | {ht['compressibility'][key]:>11.4f}")
    for label, key in (("alpha per unit (Mohammadi)", "alpha_mohammadi_units"), ("alpha per unit (Hill)",
                                                                                 "alpha_hill_units")):
        lines.append(f"{label:>27} | {tail_index(van['compressibility'][key]):>11} |"
                     f" {tail_index(ht['compressibility'][key]):>11}")
    lines.append(f"{'accuracy AUC (neuron)':>27} | {van['auc']:>11.4f} | {ht['auc']:>11.4f}")
    lines.append(TAIL_INDEX_NOTE)
    return "\n".join(lines)


def verdict(results: dict[str, Any]) -> str:
    """The paper's three questions, answered only where the difference exceeds the spread over the seeds."""
    summary = results["summary"]
    van, ht = summary["vanilla"], summary["heavytail"]
    n = len(van["accuracy"]["values"])
    lines = []

    ratio_gap = ht["epsilon_ratio"]["mean"] - van["epsilon_ratio"]["mean"]
    ratio_spread = ht["epsilon_ratio"]["std"] + van["epsilon_ratio"]["std"]
    shown = n > 1 and ratio_gap > ratio_spread
    answer = "yes" if shown else ("not judged (one seed: no spread)" if n < 2 else "not shown")
    lines.append(
        f"more compressible: {answer}: epsilon ratio {_pm(ht['epsilon_ratio'], 3)} vs"
        f" {_pm(van['epsilon_ratio'], 3)}, difference {ratio_gap:+.3f}"
        f" {'exceeds' if shown else 'does not exceed'} the seed spread {ratio_spread:.3f} (sum of the two sd)"
    )

    drops = [a - b for a, b in zip(ht["accuracy"]["values"], ht["epsilon_accuracy"]["values"], strict=True)]
    worst = max(drops)
    held = worst <= HELD_POINTS / 100
    lines.append(
        f"accuracy held at the epsilon point (within {HELD_POINTS:g} points): {'yes' if held else 'no'}: heavytail"
        f" {_pm(ht['epsilon_accuracy'], 3)} pruned vs {_pm(ht['accuracy'], 3)} unpruned,"
        + (f" within {100 * worst:.1f} points on every seed" if held else
           f" loses up to {100 * worst:.1f} points (worst seed)")
        + f" (mean loss {100 * statistics.fmean(drops):.1f} points)"
    )

    paired = [a - b for a, b in zip(ht["epsilon_accuracy"]["values"],
                                    van["accuracy_at_heavytail_ratio"]["values"], strict=True)]
    gap = spread(paired)
    if n > 1 and abs(gap["mean"]) > gap["std"]:
        better = "better" if gap["mean"] > 0 else "worse"
        tail = f"heavytail {better} than vanilla pruned to the same ratio"
    elif n < 2:
        tail = "vanilla pruned to the same ratio: not judged (one seed: no spread)"
    else:
        tail = "vanilla pruned to the same ratio is as good (the difference is within the seed spread)"
    lines.append(
        f"{tail}: {_pm(ht['epsilon_accuracy'], 3)} vs {_pm(van['accuracy_at_heavytail_ratio'], 3)},"
        f" paired difference {gap['mean']:+.3f} ± {gap['std']:.3f}"
    )
    not_reached = sum(not run["reached_stop"] for name in RUN_NAMES for run in results[name]["runs"])
    if not_reached:
        lines.append(f"note: {not_reached} run(s) did not reach the stopping accuracy within --epochs")
    return "\n".join(lines)




_MARKER_POINTS = 5.0  # marker size; the two runs' markers sit this far apart and more (see plot)


def plot(results: dict[str, Any], path: Path | None = None) -> Figure:
    """The mean neuron and global pruning curves of both runs, epsilon points marked; saved to ``path`` if given.

    The x axis is ``sparsity_axis`` (labelled in sparsities), so the high-sparsity end, where the curves part, is not
    squeezed; the two runs' markers are shifted 0.6 marker widths left and right of their sparsity (by an offset in
    points, not data), so markers at the same level never cover each other.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import offset_copy

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    summary = results["summary"]
    styles = {"vanilla": ("o", -0.6 * _MARKER_POINTS), "heavytail": ("s", 0.6 * _MARKER_POINTS)}
    for ax, (title, method) in zip(axes, (("neuron pruning (hidden units)", "neuron"),
                                          ("global magnitude pruning", "global")), strict=True):
        for name, (marker, shift) in styles.items():
            moved = offset_copy(ax.transData, fig=figure, x=shift, y=0.0, units="points")
            curve = results[name] if method == "neuron" else results[name]["global"]
            line = ax.plot([sparsity_axis(s) for s in curve["sparsity"]], curve["accuracy"], marker=marker,
                           markersize=_MARKER_POINTS, transform=moved, label=name)[0]
            if method == "neuron":  # the epsilon point: units pruned vs accuracy (mean over the seeds)
                ratio = summary[name]["epsilon_ratio"]["mean"]
                ax.plot([sparsity_axis(ratio)], [summary[name]["epsilon_accuracy"]["mean"]], "*", markersize=14,
                        markeredgecolor="black", color=line.get_color(), transform=moved,
                        label=f"{name}, epsilon point ({ratio:.2f} pruned)")
        ax.set_title(title)
        label_sparsity_axis(ax, DEMO_SPARSITIES, "measured sparsity of the hidden layer")  # the levels asked for
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
    cfg = results["config"]
    figure.suptitle(
        f"{cfg['model']}, {cfg['dataset']}, width {cfg['width']}, lr {cfg['lr']:g}, mean of {cfg['seeds']} seed(s);"
        f" heavytail: alpha {cfg['alpha']:g}, sigma {cfg['sigma']:g}, {cfg['structure']} noise"
    )
    if path is not None:
        figure.savefig(path)
    return figure
