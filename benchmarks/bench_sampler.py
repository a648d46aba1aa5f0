"""Speed of the symmetric alpha-stable sampler against named baselines, in millions of draws per second.

    python benchmarks/bench_sampler.py [--n 4194304] [--reps 7] [--alpha 1.75] [--device cpu|cuda]

Rows: ``sample_stable`` on its eager kernel (LIGHTNING_HEAVYTAIL_COMPILE=0), on its fused torch.compile kernel
(LIGHTNING_HEAVYTAIL_COMPILE=1) and as it runs by default (fused for at least 2**20 draws where compiling works);
scipy.stats.levy_stable.rvs (CPU only); pyro's Stable.rsample (skipped when pyro is not installed); torch.randn (the
Gaussian floor) and torch.rand of the 2 uniforms per draw that the CMS transform needs. Every row is timed once per
round, rounds interleaved so that load from other processes hits all rows alike; the figure is the median over rounds
after a warm-up, compile time excluded (and printed separately); on CUDA every call is synchronized. scipy runs on a
smaller ``--scipy-n`` because it is slow; its rate is per draw like the rest. Timings on a shared machine are noisy:
run it a few times and report the spread.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.stats
import torch

from lightning_heavytail import sample_stable
from lightning_heavytail._counters import COMPILE_ENV as ENV
from lightning_heavytail._counters import compile_available


def _with_env(value: str | None, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        previous = os.environ.get(ENV)
        if value is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = value
        try:
            return fn()
        finally:
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous

    return run


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1 << 22, help="draws per call")
    parser.add_argument("--scipy-n", type=int, default=1 << 20, help="draws per scipy call")
    parser.add_argument("--reps", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--alpha", type=float, default=1.75, help="stability index (the paper's README uses 1.75)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    n, alpha, device = args.n, args.alpha, torch.device(args.device)
    g = torch.Generator(device).manual_seed(0)
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = fn()
            sync()
            return out
        return run

    # Compile outside the timing: the first fused call pays it.
    t0 = time.perf_counter()
    timed(_with_env("1", lambda: sample_stable(alpha, n, generator=g, device=device)))()
    compile_s = time.perf_counter() - t0
    fused_ok = _with_env("1", lambda: compile_available(device))()

    rows: dict[str, tuple[int, Callable[[], object]]] = {
        "torch.randn (Gaussian floor)": (n, timed(lambda: torch.randn(n, generator=g, device=device))),
        "torch.rand x2 (CMS's 2 uniforms per draw)": (
            n, timed(lambda: torch.rand((2, n), generator=g, device=device))),
        "sample_stable default": (n, timed(_with_env(None, lambda: sample_stable(alpha, n, generator=g,
                                                                                  device=device)))),
        "sample_stable fused (LIGHTNING_HEAVYTAIL_COMPILE=1)": (
            n, timed(_with_env("1", lambda: sample_stable(alpha, n, generator=g, device=device)))),
        "sample_stable eager (LIGHTNING_HEAVYTAIL_COMPILE=0)": (
            n, timed(_with_env("0", lambda: sample_stable(alpha, n, generator=g, device=device)))),
        "scipy.stats.levy_stable.rvs (CPU)": (
            args.scipy_n, lambda: scipy.stats.levy_stable.rvs(alpha, 0.0, size=args.scipy_n, random_state=rng)),
    }
    try:
        from pyro.distributions import Stable

        pyro_dist = Stable(torch.tensor(alpha, device=device), torch.tensor(0.0, device=device))
        rows["pyro Stable.rsample"] = (n, timed(lambda: pyro_dist.rsample((n,))))
    except ImportError:
        print("pyro-ppl not installed: pyro row skipped")

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _, fn in rows.values():  # warm-up
        fn()
    for _ in range(args.reps):
        for name, (_, fn) in rows.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3

    rate = {name: rows[name][0] / statistics.median(ts) / 1e6 for name, ts in times.items()}
    spread = {name: (rows[name][0] / max(ts) / 1e6, rows[name][0] / min(ts) / 1e6) for name, ts in times.items()}
    randn, scipy_rate = rate["torch.randn (Gaussian floor)"], rate["scipy.stats.levy_stable.rvs (CPU)"]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, alpha={alpha}, n={n}, "
          f"scipy n={args.scipy_n}, median of {args.reps} interleaved rounds")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (other processes share the CPU)")
    print(f"compile fused path: {'ok' if fused_ok else 'FAILED (eager fallback)'}; first fused call {compile_s:.1f} s")
    print()
    print("| sampler | M draws/s (median) | min-max over rounds | vs torch.randn | vs scipy |")
    print("|---|---:|---:|---:|---:|")
    for name in rows:
        lo, hi = spread[name]
        print(f"| {name} | {rate[name]:.1f} | {lo:.1f}-{hi:.1f} | {rate[name] / randn:.2f}x | "
              f"{rate[name] / scipy_rate:.1f}x |")
    print()
    default = rate["sample_stable default"]
    for label, value, target in [("vs torch.randn", default / randn, 0.35), ("vs scipy", default / scipy_rate, 10.0)]:
        verdict = "met" if value >= target else "MISSED"
        print(f"target sample_stable default {label} >= {target}x: {value:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
