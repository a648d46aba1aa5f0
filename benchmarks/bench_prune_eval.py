"""Cost of a K-level pruning curve, evaluated in one pass over the data, against plain passes and the earlier ways.

Two loaders, the same model (the paper's MNIST MLP, 784-5000-10 ReLU, no bias), metric (micro accuracy) and the
callback's default K = 7 levels:

- **cheap**: an in-memory ``TensorDataset`` (``--samples``, default 5,000, batch 1000), where the forward passes are the
  cost. Rows: "K plain passes" (the unpruned model evaluated K times: the floor of any level-by-level curve);
  per method, ``evaluate_pruning_curve`` (one pass: each batch loaded once, every level run on it), "one pass per
  level" (the same plans and writes, each level scored in its own pass over the data: the way before one-pass), and
  "naive" (per level ``copy.deepcopy(model)``, ``torch.nn.utils.prune``, one pass). Target: the one-pass curve no
  slower than one pass per level.
- **slow**: a dataset whose ``__getitem__`` sleeps ``--ms-per-sample`` (default 2 ms, like decoding or a remote store;
  ``--slow-samples`` 1,000, batch 100), where loading is the cost. Rows: "1 plain pass", "floor" (each batch loaded
  once and run K times through the unpruned model: what any one-pass K-level curve costs at least), the one-pass
  curve of each method, "one pass per level" for ``"global"`` (about K times one pass), and the callback's evaluation
  (``evaluate_pruning``: every method and the epsilon point in the same pass). Target: the K = 7 level curve in at
  most 1.5x the time of one plain pass. That needs the K - 1 extra forwards to cost less than half the loading: true
  on a GPU, not on a 2-core CPU with the 784-5000-10 MLP (its 7 forwards of a batch cost about twice its loading
  there); ``--slow-width`` runs this scenario with another hidden width.

Rounds are interleaved (every row once per round) and each row reports the median wall time, its spread (min-max)
and, as ratios, the median over rounds of (row / baseline in that round); and the same ratio in CPU time (process
time, all threads), which other jobs on a shared machine disturb far less than wall time (on CUDA it is the host's
time only). The script also checks that every way gives the same accuracies.

Run:  python benchmarks/bench_prune_eval.py                      (about 7 minutes on 2 shared CPU cores)
      python benchmarks/bench_prune_eval.py --device cuda        (the GPU run of benchmarks/run_gpu.sh)
      python benchmarks/bench_prune_eval.py --rounds 5 --methods global,neuron --skip-slow
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_heavytail.pruning import REGISTRY, evaluate_pruning, evaluate_pruning_curve
from lightning_heavytail.pruning._evaluator import CurveTask, levels_applied
from lightning_heavytail.pruning._probe import prepare, select_targets

LEVELS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def make_model(width: int, device: torch.device, classes: int = 10, features: int = 784) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, width, bias=False), nn.ReLU(), nn.Linear(width, classes, bias=False))
    return model.to(device)


def make_data(samples: int, model: nn.Module, features: int = 784) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, features, generator=g)
    with torch.no_grad():  # labels from the model itself plus noise, so accuracy falls as pruning grows
        logits = model(x.to(next(model.parameters()).device)).cpu()
        y = (logits + 3.0 * torch.randn(samples, 10, generator=g)).argmax(dim=1)
    return x, y


class SlowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Each sample costs ``seconds`` to load (a sleep: the cost of decoding or of a remote store, no CPU used)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seconds: float) -> None:
        self.x, self.y, self.seconds = x, y, seconds

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.seconds)
        return self.x[i], self.y[i]


def synchronized(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_pass(model: nn.Module, loader: DataLoader[Any], device: torch.device) -> float:
    metric = MulticlassAccuracy(num_classes=10, average="micro").to(device)
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            metric.update(model(x.to(device)), y.to(device))
    return float(metric.compute())


def naive_curve(model: nn.Module, loader: DataLoader[Any], method: str, device: torch.device) -> list[float]:
    values = []
    for level in LEVELS:
        clone = copy.deepcopy(model)
        layers = [m for m in clone.modules() if isinstance(m, nn.Linear)][:1]  # the hidden layer, as the default
        if method == "global":
            prune.global_unstructured([(m, "weight") for m in layers], prune.L1Unstructured, amount=level)
        elif method == "layerwise":
            for m in layers:
                prune.l1_unstructured(m, "weight", amount=level)
        else:
            for m in layers:
                prune.ln_structured(m, "weight", amount=level, n=2, dim=0)
        values.append(plain_pass(clone, loader, device))
        del clone
    return values


def one_pass_per_level(model: nn.Module, loader: DataLoader[Any], method: str) -> list[float]:
    """The way before one-pass: the same checks, plans and writes, but each level scored in a pass of its own."""
    run = prepare(model, loader, None, None, None, (), None)
    targets, _ = select_targets(model, None, run.exclude, run.probe)
    pruning_method = REGISTRY[method]
    with levels_applied(model, targets if pruning_method.in_place else []) as writer:
        task = CurveTask(method, model, targets, LEVELS, run.scorer, run.example, run.forward)
        states = pruning_method.states(task, writer)
        return [run.scorer.score([state])[0]["accuracy"] for state in states]


def k_forwards(model: nn.Module, loader: DataLoader[Any], device: torch.device) -> list[float]:
    """The floor of a one-pass K-level curve: each batch loaded once and run K times (no pruning, no copies)."""
    metrics = [MulticlassAccuracy(num_classes=10, average="micro").to(device) for _ in LEVELS]
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            for metric in metrics:
                metric.update(model(x), y)
    return [float(metric.compute()) for metric in metrics]


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Wall time, CPU time (this process, all threads), and the result of ``fn()``."""
    synchronized(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronized(device)
    return time.perf_counter() - start, time.process_time() - cpu, out


def report(title: str, times: dict[str, list[float]], baseline: str, cpu: dict[str, list[float]]) -> None:
    print(f"\n{title}\n{'what':<44}{'median s':>9}{'min-max s':>14}{'x ' + baseline:>24}{'cpu s':>8}{'x (cpu)':>9}")
    for name, values in times.items():
        spread = f"{min(values):.3f}-{max(values):.3f}"
        print(f"{name:<44}{statistics.median(values):>9.3f}{spread:>14}{ratio_of(times, name, baseline):>23.2f}x"
              f"{statistics.median(cpu[name]):>8.2f}{ratio_of(cpu, name, baseline):>8.2f}x")


def run_rounds(rounds: int, rows: dict[str, Callable[[], Any]],
               device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Any]]:
    """Wall times, CPU times and the last results of each row, over interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    results: dict[str, Any] = {}
    for _ in range(rounds):
        for name, fn in rows.items():
            seconds, cpu_seconds, results[name] = timed(fn, device)
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)
    return times, cpu, results


def accuracies(result: Any) -> list[float]:
    if hasattr(result, "metrics"):
        return list(result.metrics["accuracy"])
    return list(result)


def check_agreement(results: dict[str, Any], groups: Sequence[Sequence[str]]) -> None:
    for names in groups:
        values = [accuracies(results[name]) for name in names]
        largest = max(abs(a - b) for other in values[1:] for a, b in zip(values[0], other, strict=True))
        print(f"  {' / '.join(names)}: largest accuracy difference {largest:.2g}")


Rows = dict[str, Callable[[], Any]]
FLOOR = f"floor: 1 load + {len(LEVELS)} forwards per batch"


def cheap_rows(model: nn.Module, loader: DataLoader[Any], methods: Sequence[str], device: torch.device) -> Rows:
    rows: Rows = {"K plain passes": lambda: [plain_pass(model, loader, device) for _ in LEVELS]}
    for method in methods:
        rows[f"{method}: one pass"] = lambda m=method: evaluate_pruning_curve(model, loader, LEVELS, method=m)
        rows[f"{method}: one pass per level"] = lambda m=method: one_pass_per_level(model, loader, m)
        if method in ("global", "layerwise", "neuron"):
            rows[f"{method}: naive (deepcopy + torch prune)"] = lambda m=method: naive_curve(model, loader, m, device)
    return rows


def slow_rows(model: nn.Module, loader: DataLoader[Any], methods: Sequence[str], device: torch.device) -> Rows:
    rows: Rows = {"1 plain pass": lambda: plain_pass(model, loader, device),
                  FLOOR: lambda: k_forwards(model, loader, device)}
    for method in methods:
        rows[f"{method}: one pass"] = lambda m=method: evaluate_pruning_curve(model, loader, LEVELS, method=m)
    rows["global: one pass per level"] = lambda: one_pass_per_level(model, loader, "global")
    several = [m for m in methods if m != "structured"][:3] or ["global"]
    rows[f"{'+'.join(several)} + epsilon point, one pass"] = lambda: evaluate_pruning(model, loader, LEVELS,
                                                                                      methods=several, epsilon=0.1)
    return rows


def warmed_up(make: Callable[[DataLoader[Any]], Rows], model: nn.Module, loader: DataLoader[Any]) -> Rows:
    """The rows on ``loader``, each run once first on two small in-memory batches (imports, first sorts, caches)."""
    x, y = make_data(64, model)
    for fn in make(DataLoader(TensorDataset(x, y), batch_size=32)).values():
        fn()
    return make(loader)


def ratio_of(times: dict[str, list[float]], name: str, baseline: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (timings synchronized)")
    parser.add_argument("--width", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=5000, help="cheap loader: samples (batch --batch-size)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--slow-samples", type=int, default=1000, help="slow loader: samples (batch 100)")
    parser.add_argument("--slow-width", type=int, default=None, help="slow loader: hidden width (default --width)")
    parser.add_argument("--ms-per-sample", type=float, default=2.0, help="slow loader: cost of one sample")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median and spread reported)")
    parser.add_argument("--methods", default="global,layerwise,neuron,svd,structured")
    parser.add_argument("--skip-cheap", action="store_true")
    parser.add_argument("--skip-slow", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    methods = args.methods.split(",")
    model = make_model(args.width, device)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {name}, load average"
          f" {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"model 784-{args.width}-10 ({n_params / 1e6:.2f} M weights) on {device}, K = {len(LEVELS)} levels {LEVELS},"
          f" {args.rounds} interleaved rounds after one warm-up run of each row")

    if not args.skip_cheap:
        x, y = make_data(args.samples, model)
        cheap = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
        rows = warmed_up(lambda loader: cheap_rows(model, loader, methods, device), model, cheap)
        times, cpu, results = run_rounds(args.rounds, rows, device)
        report(f"cheap loader: {args.samples} in-memory samples, batch {args.batch_size}", times, "K plain passes", cpu)
        print("\nagreement (one pass vs one pass per level, and the naive way):")
        check_agreement(results, [[f"{m}: one pass", f"{m}: one pass per level"] +
                                  ([f"{m}: naive (deepcopy + torch prune)"] if m in ("global", "layerwise", "neuron")
                                   else []) for m in methods])
        for method in methods:
            ratio = ratio_of(times, f"{method}: one pass", f"{method}: one pass per level")
            ratio_cpu = ratio_of(cpu, f"{method}: one pass", f"{method}: one pass per level")
            print(f"  {method}: one pass / one pass per level = {ratio:.2f}x wall, {ratio_cpu:.2f}x CPU time (target:"
                  " not slower)")
        if "structured" in methods:
            curve = results["structured: one pass"]
            held = sum(1.0 - s for s in curve.sparsities[1:])
            print(f"  structured holds its {len(LEVELS) - 1} pruned copies at once: {held:.2f}x the model's"
                  " parameters (one copy at a time before)")

    if not args.skip_slow:
        width = args.slow_width or args.width
        if width != args.width:
            model = make_model(width, device)
        x, y = make_data(args.slow_samples, model)
        slow = DataLoader(SlowDataset(x, y, args.ms_per_sample / 1000), batch_size=100)
        rows = warmed_up(lambda loader: slow_rows(model, loader, methods, device), model, slow)
        times, cpu, results = run_rounds(args.rounds, rows, device)
        report(f"slow loader: {args.slow_samples} samples at {args.ms_per_sample:g} ms each, batch 100, model"
               f" 784-{width}-10", times, "1 plain pass", cpu)
        print("\nagreement:")
        check_agreement(results, [["global: one pass", "global: one pass per level"]])
        for method in methods:
            ratio = ratio_of(times, f"{method}: one pass", "1 plain pass")
            verdict = "met" if ratio <= 1.5 else "MISSED"
            print(f"  {method}: the {len(LEVELS)}-level curve in {ratio:.2f}x one plain pass (target <= 1.5x):"
                  f" {verdict}; {ratio_of(times, f'{method}: one pass', FLOOR):.2f}x the floor")


if __name__ == "__main__":
    main()
