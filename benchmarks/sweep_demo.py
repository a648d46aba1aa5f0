"""The sweep behind the demo's defaults: noise level sigma x width x seeds, measured the paper's way.

Every run is one run of ``lightning-heavytail demo`` (``lightning_heavytail.demo.train_run``: the same model, full-batch
SGD, stopping rule, noise callback and epsilon point), so the table reads like the demo's. For each model and width,
the vanilla runs (sigma 0) are trained once per seed and shared by every sigma; each heavy-tailed run starts from the
same initialization as the vanilla run of its seed.

Columns (mean ± sample sd over the seeds): ``test``: unpruned test accuracy; ``ratio``: the epsilon point's share of
hidden units pruned (epsilon 0.1); ``pruned``: test accuracy at the epsilon point, no fine-tuning; ``vanilla@same``:
the vanilla network of the same seed pruned to that ratio (``evaluate_at_ratios``); ``steps``: SGD steps to the
stopping rule. ``ratio > vanilla`` says whether the ratio exceeds the vanilla ratio by more than the sum of the two sd
(the demo's verdict rule); ``held`` whether no seed loses more than 2 points at the epsilon point.

Run:  python benchmarks/sweep_demo.py                      (both models, DEFAULT_PLAN: about 10-12 minutes on 2 CPU
                                                            cores; measured in parts: mean-field widths 2000 and 5000
                                                            74 s, width 20000 451 s, standard 176 s)
      python benchmarks/sweep_demo.py --model meanfield --widths 5000 --sigmas 0.1 --seeds 5
      python benchmarks/sweep_demo.py --dataset mnist5k --widths 2048 --sigmas 0.1 --seeds 3   (needs the data extra)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from lightning_heavytail.cli import MODEL_DEFAULTS, DemoConfig
from lightning_heavytail.demo import demo_datamodule, demo_output, train_run
from lightning_heavytail.pruning import evaluate_at_ratios


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: Sequence[float], digits: int = 3) -> str:
    return f"{statistics.fmean(values):.{digits}f} ± {_sd(values):.{digits}f}"


def sweep(model: str, dataset: str, widths: Sequence[int], sigmas: Sequence[float], seeds: int, lr: float | None,
          alpha: float) -> list[dict[str, Any]]:
    """Train every (width, seed, sigma) run once; return one row per (width, sigma), vanilla first."""
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for width in widths:
            base = DemoConfig(dataset=dataset, model=model, width=width, lr=lr, alpha=alpha, seeds=seeds, out=out,
                              quiet=True)
            datamodule = demo_datamodule(base)
            by_sigma: dict[float, list[dict[str, Any]]] = {}
            for seed in base.seed_list():
                started = time.perf_counter()
                vanilla_net, vanilla = train_run("vanilla", seed, base, datamodule)
                by_sigma.setdefault(0.0, []).append(vanilla)
                for sigma in sigmas:
                    config = DemoConfig(**{**base.__dict__, "sigma": sigma})
                    _, noisy = train_run("heavytail", seed, config, datamodule)
                    ratios = noisy["epsilon_point"]["ratios"]
                    noisy["vanilla_at_same"] = evaluate_at_ratios(vanilla_net, datamodule.test_dataloader(),
                                                                  ratios)["accuracy"]
                    by_sigma.setdefault(sigma, []).append(noisy)
                print(f"  {model} width {width} seed {seed}: {1 + len(sigmas)} runs in"
                      f" {time.perf_counter() - started:.1f} s", flush=True)
            for sigma, runs in by_sigma.items():
                rows.append(_row(model, dataset, width, base.learning_rate, sigma, runs, by_sigma[0.0]))
    return rows


def _row(model: str, dataset: str, width: int, lr: float, sigma: float, runs: list[dict[str, Any]],
         vanilla: list[dict[str, Any]]) -> dict[str, Any]:
    test = [run["accuracy"][0] for run in runs]
    ratio = [run["epsilon_point"]["ratio"] for run in runs]
    pruned = [run["epsilon_point"]["metrics"]["accuracy"] for run in runs]
    van_ratio = [run["epsilon_point"]["ratio"] for run in vanilla]
    return {
        "model": model, "dataset": dataset, "width": width, "lr": lr, "sigma": sigma,
        "test": test, "ratio": ratio, "pruned": pruned,
        "vanilla_at_same": [run["vanilla_at_same"] for run in runs] if sigma else None,
        "steps": [run["global_step"] for run in runs],
        "reached": sum(run["reached_stop"] for run in runs),
        "ratio_above_vanilla": sigma > 0 and statistics.fmean(ratio) - statistics.fmean(van_ratio)
        > _sd(ratio) + _sd(van_ratio),
        "held": max(t - p for t, p in zip(test, pruned, strict=True)) <= 0.02,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model, data, width, lr | σ | test | ratio | pruned | vanilla@same | steps | ratio > vanilla | held |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        setting = f"{row['model']}, {row['dataset']}, {row['width']}, {row['lr']:g}"
        same = _pm(row["vanilla_at_same"]) if row["vanilla_at_same"] else "–"
        verdict = ("yes" if row["ratio_above_vanilla"] else "no") if row["sigma"] else "–"
        reached = "" if row["reached"] == len(row["test"]) else f" ({row['reached']}/{len(row['test'])} reach)"
        lines.append(
            f"| {setting} | {row['sigma']:g} | {_pm(row['test'])}{reached} | {_pm(row['ratio'])} |"
            f" {_pm(row['pruned'])} | {same} | {_pm(row['steps'], 1)} | {verdict} |"
            f" {'yes' if row['held'] else 'no'} |"
        )
    return "\n".join(lines)


DEFAULT_PLAN: dict[str, tuple[list[int], list[float]]] = {
    "meanfield": ([2000, 5000, 20000], [0.05, 0.1, 0.2]),
    "standard": ([5000], [0.01, 0.03]),
}
"""Without ``--model``: per model, the widths and noise levels swept (about 10 minutes on 2 CPU cores)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(MODEL_DEFAULTS), default=None,
                        help="one model (default: both, with DEFAULT_PLAN's widths and sigmas)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--sigmas", type=float, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=None, help="default: the demo's for the model")
    parser.add_argument("--alpha", type=float, default=1.75)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    with demo_output():
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch threads"
              f" {__import__('torch').get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)
        started = time.perf_counter()
        rows = []
        for model in [args.model] if args.model else list(DEFAULT_PLAN):
            widths, sigmas = DEFAULT_PLAN[model]
            rows += sweep(model, args.dataset, args.widths or widths, args.sigmas or sigmas, args.seeds, args.lr,
                          args.alpha)
    print(table(rows))
    print(f"\n{time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
