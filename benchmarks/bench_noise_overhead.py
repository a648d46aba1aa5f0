"""What heavy-tailed noise costs in training.

1. A training step of the paper's one-hidden-layer MLP (784 inputs, width 2048, 10 classes, no bias, batch 128,
   plain SGD) on the CPU: without noise; with plain torch.randn noise added the same way (the floor any noise pays);
   with lightning-heavytail's "iid" and "neuron" noise (the exact code the callback's step hook runs).
2. Noise for one 5000x784 layer: the authors' way (scipy.stats.levy_stable.rvs on the CPU every step, then copied
   into the weight) against ours.
3. The same for the authors' README setting (width 5000, batch 5000), where the step is far larger.
4. Many small tensors: 200 parameters of 64x64 (a 200-layer MLP of 64 units), neuron noise against one
   ``torch._foreach_add_`` over the same tensors (the floor of touching every parameter once).
5. End to end through a Lightning Trainer with and without HeavyTailNoiseCallback.

The noise runs exactly as the callback's step hook runs it: a ``NoisePlan`` built once, applied at every step (the
non-finite check included, ``on_nonfinite="raise"``).

Targets (issue 13): "neuron" noise at most 2% of the MLP's step at batch 128 (judged on the noise alone, the precise
figure: step-time differences of 1-2% drown in the machine's drift); "iid" adds at most 1.5x what torch.randn noise
adds; the 200 small tensors get their neuron noise in at most 2x one ``torch._foreach_add_``; ours at least 100x
faster than the authors' way.

Run:  python benchmarks/bench_noise_overhead.py  [--steps 200] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as pl
import scipy.stats
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_heavytail import HeavyTailNoiseCallback, noise_scale, select_parameters
from lightning_heavytail.noise import NoisePlan

ALPHA, SIGMA, LR = 1.75, 0.003, 0.01
DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def mlp(width: int = 2048) -> nn.Module:
    return nn.Sequential(nn.Linear(784, width, bias=False), nn.ReLU(), nn.Linear(width, 10, bias=False)).to(DEVICE)


def deep_mlp(blocks: int = 200, width: int = 64) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(blocks)]).to(DEVICE)


def noise_adder(kind: str, targets: list[tuple[str, nn.Parameter]]) -> Callable[[float, int], None]:
    """One step's noise of the given kind: "none", "randn" (the floor), "authors" (scipy, full shape) or a structure
    (a NoisePlan built once, applied per step: what the callback's hook runs)."""
    plan = NoisePlan(targets, kind) if kind in ("iid", "neuron", "elliptical") else None

    @torch.no_grad()
    def add(scale: float, step: int) -> None:
        if kind == "randn":
            for _, p in targets:
                p.add_(torch.randn_like(p), alpha=scale)
        elif kind == "authors":
            for _, p in targets:
                draws = scipy.stats.levy_stable.rvs(ALPHA, 0.0, size=tuple(p.shape))
                p.add_(torch.from_numpy(draws).float().to(p.device), alpha=scale)
        elif plan is not None:
            plan.apply([scale] * len(targets), ALPHA, seed=0, step=step)
        sync()

    return add


def median_ms(fn: Callable[[int], object], reps: int, warmup: int = 5) -> float:
    """Median milliseconds of ``fn(i)`` over ``reps`` calls after ``warmup`` calls."""
    times = []
    for i in range(reps + warmup):
        t0 = time.perf_counter()
        fn(i)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def step_timer(noise: str, steps: int, width: int = 2048, batch: int = 128) -> float:
    """Median ms per training step (forward, backward, SGD step, then the noise)."""
    torch.manual_seed(0)
    model = mlp(width)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = torch.randn(batch, 784, device=DEVICE), torch.randint(0, 10, (batch,), device=DEVICE)
    add = noise_adder(noise, select_parameters(model))
    scale = noise_scale(SIGMA, LR, ALPHA)

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        add(scale, i)

    return median_ms(step, steps, warmup=min(10, steps))


def noise_only_timer(noise: str, reps: int, model: nn.Module) -> float:
    """Median ms of the noise alone on the model's weights (what the callback's step hook runs), no training step."""
    add = noise_adder(noise, select_parameters(model))
    scale = noise_scale(SIGMA, LR, ALPHA)
    return median_ms(lambda i: add(scale, i), reps)


def foreach_add_timer(model: nn.Module, reps: int) -> float:
    """Median ms of one torch._foreach_add_ over the model's weights: every tensor read and written once."""
    params = [p for _, p in select_parameters(model)]
    others = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def add(i: int) -> None:
        torch._foreach_add_(params, others)

    return median_ms(add, reps)


def layer_noise_timer(kind: str, reps: int) -> float:
    """Median ms to add one step's noise to a 5000x784 weight."""
    weight = nn.Parameter(torch.zeros(5000, 784, device=DEVICE))
    add = noise_adder(kind, [("w", weight)])
    scale = noise_scale(SIGMA, LR, ALPHA)
    return median_ms(lambda i: add(scale, i), reps, warmup=1)


def trainer_timer(with_noise: bool, steps: int) -> float:
    """Seconds per step of Trainer.fit over `steps` batches (Lightning's own overhead included)."""
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(128 * steps, 784), torch.randint(0, 10, (128 * steps,))),
                      batch_size=128)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    callbacks = [HeavyTailNoiseCallback(ALPHA, SIGMA, structure="neuron", seed=0)] if with_noise else []
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.fit(Module(), data)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median round is reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, alpha={ALPHA} sigma={SIGMA} lr={LR},"
          f" load average {os.getloadavg()[0]:.2f}")

    kinds = ["none", "randn", "iid", "neuron", "elliptical"]
    rounds: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):  # interleave the variants so drift in machine load hits them alike
        for kind in kinds:
            rounds[kind].append(step_timer(kind, args.steps))
    step = {k: statistics.median(v) for k, v in rounds.items()}
    model = mlp()
    alone = {k: noise_only_timer(k, 5 * args.steps, model) for k in kinds[1:]}
    base = step["none"]
    print("\n1. MLP 784-2048-10, batch 128, SGD: median ms per training step, and the noise alone (same tensors)")
    print("   The step-time difference drifts by a few % between rounds on a shared machine; the noise alone is the")
    print("   precise figure of what the noise adds (it runs outside the step: the step itself is unchanged).")
    print(f"   {'variant':<28}{'ms/step':>9}{'added ms':>10}{'noise alone ms':>16}{'% of step':>11}{'x randn':>9}")
    for kind in kinds:
        added = step[kind] - base
        label = {"none": "no noise (baseline)", "randn": "torch.randn noise (floor)"}.get(kind, f"heavytail {kind}")
        if kind == "none":
            print(f"   {label:<28}{step[kind]:>9.3f}{added:>10.3f}{'-':>16}{'-':>11}{'-':>9}")
            continue
        print(f"   {label:<28}{step[kind]:>9.3f}{added:>10.3f}{alone[kind]:>16.3f}"
              f"{100 * alone[kind] / base:>10.2f}%{alone[kind] / alone['randn']:>9.2f}")
    iid_ratio = alone["iid"] / alone["randn"]
    iid_step_ratio = (step["iid"] - base) / (step["randn"] - base)
    neuron_pct = 100 * alone["neuron"] / base
    print(f"   target iid adds <= 1.5x what randn adds: noise alone {iid_ratio:.2f}x"
          f" -> {'MET' if iid_ratio <= 1.5 else 'MISSED'} (step difference {iid_step_ratio:.2f}x)")
    print(f"   target neuron <= 2% of step: noise alone {neuron_pct:.2f}%,"
          f" step difference {100 * (step['neuron'] - base) / base:+.2f}% -> {'MET' if neuron_pct <= 2 else 'MISSED'}")

    print("\n2. Noise for one 5000x784 layer: median ms per step")
    ways = {"authors": "authors (scipy rvs + copy)", "randn": "torch.randn + add (floor)", "iid": "iid",
            "neuron": "neuron"}
    layer = {kind: layer_noise_timer(kind, 5 if kind == "authors" else 30) for kind in ways}
    authors = layer["authors"]
    for kind, label in ways.items():
        print(f"   {label:<28}{layer[kind]:>10.2f} ms   {authors / layer[kind]:>8.1f}x vs the authors' way")
    for way in ("iid", "neuron"):
        speedup = authors / layer[way]
        print(f"   target >= 100x ({way}): {speedup:.0f}x -> {'MET' if speedup >= 100 else 'MISSED'}")

    print("\n3. The authors' README setting, MLP 784-5000-10, batch 5000: ms per step and the neuron noise alone")
    big_step = step_timer("none", 10, width=5000, batch=5000)
    big_noise = noise_only_timer("neuron", 200, mlp(5000))
    print(f"   step {big_step:.1f} ms, neuron noise alone {big_noise:.3f} ms"
          f" = {100 * big_noise / big_step:.3f}% of the step")

    print("\n4. 200 weights of 64x64: one torch._foreach_add_ over them against their neuron noise (median ms)")
    deep = deep_mlp()
    floor = foreach_add_timer(deep, 5 * args.steps)
    deep_noise = {kind: noise_only_timer(kind, 5 * args.steps, deep) for kind in ("neuron", "iid")}
    for kind, ms in deep_noise.items():
        print(f"   {kind:<8} {ms:.3f} ms = {ms / floor:.2f}x the _foreach_add_ ({floor:.3f} ms)")
    ratio = deep_noise["neuron"] / floor
    print(f"   target neuron <= 2x one _foreach_add_: {ratio:.2f}x -> {'MET' if ratio <= 2 else 'MISSED'}")

    if DEVICE.type == "cpu":
        print("\n5. Lightning Trainer.fit, neuron noise via the callback: ms per step (one run each, overhead in)")
        plain, noisy = trainer_timer(False, args.steps), trainer_timer(True, args.steps)
        print(f"   without callback {plain * 1e3:.3f}   with callback {noisy * 1e3:.3f}"
              f"   added {100 * (noisy / plain - 1):.2f}%")


if __name__ == "__main__":
    main()
