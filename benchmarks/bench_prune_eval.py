"""Cost of a K-level pruning curve: evaluate_pruning_curve vs K plain evaluation passes vs the naive way.

Baselines, all on the same model, data, metric (torchmetrics micro accuracy) and levels:

- "K plain passes": the unpruned model evaluated K times (the floor: any K-level curve needs K passes over the data);
- "naive": per level, ``copy.deepcopy(model)`` then ``torch.nn.utils.prune`` (``global_unstructured`` /
  ``l1_unstructured`` per layer / ``ln_structured(n=2, dim=0)``) and one pass, as one would write it by hand or as
  Lightning's ``ModelPruning`` does on the live model.

Overhead = (curve time - K plain passes) / K plain passes; targets: under 10 %, and faster than naive. The script also
checks that both ways give the same accuracies. Default setting: the paper's MNIST model (784-5000-10 ReLU MLP, no
bias) on 10,000 synthetic MNIST-sized samples, batch 1000, the callback's default 7 levels.

Run:  python benchmarks/bench_prune_eval.py            (about a minute on 2 CPU cores)
      python benchmarks/bench_prune_eval.py --samples 2000 --width 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_heavytail.pruning import evaluate_pruning_curve

LEVELS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def make_model(width: int, classes: int = 10, features: int = 784) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, width, bias=False), nn.ReLU(), nn.Linear(width, classes, bias=False))


def make_loader(samples: int, batch_size: int, model: nn.Module, features: int = 784) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, features, generator=g)
    with torch.no_grad():  # labels from the model itself plus noise, so accuracy falls as pruning grows
        y = (model(x) + 3.0 * torch.randn(samples, 10, generator=g)).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def plain_pass(model: nn.Module, loader: DataLoader) -> float:
    metric = MulticlassAccuracy(num_classes=10, average="micro")
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            metric.update(model(x), y)
    return float(metric.compute())


def naive_curve(model: nn.Module, loader: DataLoader, levels: tuple[float, ...], method: str) -> list[float]:
    values = []
    for level in levels:
        clone = copy.deepcopy(model)
        layers = [m for m in clone.modules() if isinstance(m, nn.Linear)]
        if method == "global":
            prune.global_unstructured([(m, "weight") for m in layers], prune.L1Unstructured, amount=level)
        elif method == "layerwise":
            for m in layers:
                prune.l1_unstructured(m, "weight", amount=level)
        else:
            for m in layers:
                prune.ln_structured(m, "weight", amount=level, n=2, dim=0)
        values.append(plain_pass(clone, loader))
        del clone
    return values


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median and min reported)")
    parser.add_argument("--methods", default="global,layerwise,neuron,structured")
    args = parser.parse_args()

    model = make_model(args.width)
    loader = make_loader(args.samples, args.batch_size, model)
    levels = LEVELS
    k = len(levels)
    methods = args.methods.split(",")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()},"
          f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"model 784-{args.width}-10 ({n_params / 1e6:.2f} M weights), {args.samples} samples,"
          f" batch {args.batch_size}, K = {k} levels {levels}, median of {args.repeats}")

    plain_pass(model, loader)  # warm-up
    times: dict[str, list[float]] = {"K plain passes": []}
    for method in methods:
        times[f"evaluate_pruning_curve {method}"] = []
        if method != "structured":
            times[f"naive {method}"] = []
    agreement: dict[str, float] = {}
    for _ in range(args.repeats):
        t, _ = timed(lambda: [plain_pass(model, loader) for _ in levels])
        times["K plain passes"].append(t)
        for method in methods:
            t, curve = timed(lambda m=method: evaluate_pruning_curve(model, loader, levels, method=m))
            times[f"evaluate_pruning_curve {method}"].append(t)
            if method != "structured":
                t, naive = timed(lambda m=method: naive_curve(model, loader, levels, m))
                times[f"naive {method}"].append(t)
                diff = max(abs(a - b) for a, b in zip(curve.metrics["accuracy"], naive, strict=True))  # type: ignore[attr-defined]
                agreement[method] = max(agreement.get(method, 0.0), diff)

    plain_times = times["K plain passes"]
    print("\nTimings drift by 10-20% on a shared 2-core machine, so overheads are given two ways: from the fastest run")
    print("of each (min, the least disturbed) and as the median over rounds of (curve / K plain passes) in that round.")
    print(f"\n{'what':<36}{'median s':>10}{'min s':>9}{'min vs K plain':>16}{'per-round ratio':>17}")
    for name, values in times.items():
        ratios = [v / p for v, p in zip(values, plain_times, strict=True)]
        print(f"{name:<36}{statistics.median(values):>10.3f}{min(values):>9.3f}{min(values) / min(plain_times):>15.2f}x"
              f"{statistics.median(ratios):>16.2f}x")
    print()
    for method in methods:
        ours_times = times[f"evaluate_pruning_curve {method}"]
        by_min = min(ours_times) / min(plain_times) - 1
        by_round = statistics.median(v / p for v, p in zip(ours_times, plain_times, strict=True)) - 1
        verdict = "met" if by_round < 0.10 and by_min < 0.10 else "MISSED"
        line = (f"{method:<10} overhead vs K plain passes {by_round:+.1%} (per round), {by_min:+.1%} (min);"
                f" target < 10% both ways: {verdict}")
        if method != "structured":
            naive_times = times[f"naive {method}"]
            line += (f"; naive/ours {min(naive_times) / min(ours_times):.2f}x (min),"
                     f" {statistics.median(naive_times) / statistics.median(ours_times):.2f}x (median);"
                     f" max |accuracy difference| vs naive = {agreement[method]:.2g}")
        print(line)


if __name__ == "__main__":
    main()
