"""The ``lightning-heavytail`` command.

``lightning-heavytail demo`` trains the setting of Wan et al. (2024), a one-hidden-layer ReLU network without biases
and plain SGD, twice with the same seed: once with vanilla SGD and once with heavy-tailed (symmetric alpha-stable)
noise added to the hidden weights after every step (``HeavyTailNoiseCallback``). Both runs
carry a ``PruneEvalCallback``. The command then prints a side-by-side table of the test
accuracy of both runs under neuron pruning and their compressibility metrics, and writes under ``--out``:

- ``vanilla/version_N`` and ``heavytail/version_N``: TensorBoard logs (``tensorboard --logdir runs``) and each run's
  ``prune_eval.json`` / ``prune_eval.csv``;
- ``pruning_curves.png``: both runs' pruning curves;
- ``results.json``: ``{"config": ..., "vanilla": RUN, "heavytail": RUN}``, each RUN holding the final neuron-pruning
  curve (``sparsity``, ``accuracy``) and a ``compressibility`` dict (``fraction_prunable`` at epsilon 0.1, ...).

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
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEMO_SPARSITIES", "DemoConfig", "build_parser", "eval_every", "main", "run_demo"]

DEMO_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
"""The pruning levels the demo evaluates."""

RUN_NAMES = ("vanilla", "heavytail")
STRUCTURES = ("iid", "neuron", "elliptical")
DATASETS = ("digits", "mnist", "cifar10")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_notebook", "ddp_find_unused_parameters_true")
_EPSILON = 0.1  # the paper's budget for "fraction prunable"


@dataclass
class DemoConfig:
    """Settings of ``lightning-heavytail demo`` (the defaults are the command's defaults).

    Examples:
        >>> DemoConfig().alpha, DemoConfig().structure
        (1.8, 'neuron')
    """

    dataset: str = "digits"
    data_dir: str | None = None
    width: int = 2048
    alpha: float = 1.8
    sigma: float = 0.003
    structure: str = "neuron"
    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 64
    seed: int = 0
    accelerator: str = "auto"
    devices: str = "1"
    strategy: str = "auto"
    out: str = "runs"
    progress: bool = False
    max_train_samples: int | None = None
    max_test_samples: int | None = None

    def public(self) -> dict[str, Any]:
        """The settings recorded in ``results.json`` (not the output directory, so equal seeds give equal files)."""
        out = asdict(self)
        for key in ("out", "progress"):
            out.pop(key)
        out["noise_scale"] = self.sigma * self.lr ** (1.0 / self.alpha)
        out["sparsities"] = list(DEMO_SPARSITIES)
        out["epsilon"] = _EPSILON
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
        >>> args.command, args.width, args.dataset
        ('demo', 64, 'digits')
    """
    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="lightning-heavytail",
        description="Heavy-tailed SGD noise and pruning curves for PyTorch Lightning (Wan et al., ICML 2024).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="train vanilla SGD and heavy-tailed SGD side by side and compare their pruning curves",
        description=(
            "Train a bias-free one-hidden-layer ReLU network with plain SGD twice with the same seed, without and"
            " with heavy-tailed noise, evaluate both under pruning, print a table, and write TensorBoard logs, a"
            " PNG of the pruning curves and results.json under --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                      help="digits: scikit-learn's bundled 8x8 digits; mnist: IDX files; cifar10: python batches")
    demo.add_argument("--data-dir", default=d.data_dir,
                      help="directory with the MNIST IDX files or the CIFAR-10 python batches (never downloaded)")
    demo.add_argument("--width", type=_integer(1), default=d.width, help="hidden units")
    demo.add_argument("--alpha", type=_number(lambda a: 0.0 < a <= 2.0, "a number in (0, 2]"), default=d.alpha,
                      help="stability index of the noise (2: Gaussian)")
    demo.add_argument("--sigma", type=_number(lambda s: s > 0.0, "a finite number > 0"), default=d.sigma,
                      help="noise scale before the lr**(1/alpha) factor")
    demo.add_argument("--structure", choices=STRUCTURES, default=d.structure,
                      help="neuron: one draw per hidden unit (the paper's); iid: one per weight; elliptical")
    demo.add_argument("--epochs", type=_integer(1), default=d.epochs, help="training epochs of each run")
    demo.add_argument("--lr", type=_number(lambda x: x > 0.0, "a finite number > 0"), default=d.lr,
                      help="SGD learning rate (no momentum, no weight decay)")
    demo.add_argument("--batch-size", type=_integer(1), default=d.batch_size, help="training batch size")
    demo.add_argument("--seed", type=_integer(0), default=d.seed, help="seed of both runs")
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
        dataset=args.dataset, data_dir=args.data_dir, width=args.width, alpha=args.alpha, sigma=args.sigma,
        structure=args.structure, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, out=args.out,
        progress=args.progress, max_train_samples=args.max_train_samples, max_test_samples=args.max_test_samples,
    )


def _parse_devices(devices: str) -> int | str | list[int]:
    if devices == "auto":
        return devices
    if "," in devices:
        return [int(p) for p in devices.split(",") if p.strip()]
    return int(devices)


# ---------------------------------------------------------------------- the demo


def _quiet(progress: bool) -> None:
    """Keep the output to the table: Lightning's info messages and known harmless warnings off."""
    if progress:
        return
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_heavytail"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*ddp_spawn.*")
    warnings.filterwarnings("ignore", message=r".*`validation_step` but have no `val_dataloader`.*")
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
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        num_sanity_val_steps=0,
        default_root_dir=config.out,
    )


def eval_every(epochs: int) -> int:
    """Evaluate the pruning curves about three times per run, always after the last epoch.

    Examples:
        >>> eval_every(30), eval_every(7), eval_every(1)
        (10, 1, 1)
    """
    return max(d for d in range(1, epochs + 1) if epochs % d == 0 and epochs // d >= min(3, epochs))


def _check_noise_and_output(config: DemoConfig) -> str | None:
    """An error message for a noise scale that would overflow or an --out that cannot be a directory, else None."""
    from lightning_heavytail.noise import check_noise_scale, noise_scale

    scale = noise_scale(config.sigma, config.lr, config.alpha)
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


def _train(name: str, config: DemoConfig, datamodule: Any, version: int) -> tuple[dict[str, Any], bool]:
    """Train one run; return its final PruneEvalCallback history entry (read from the run directory) and rank."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_heavytail.callbacks.noise import HeavyTailNoiseCallback
    from lightning_heavytail.callbacks.prune_eval import PruneEvalCallback
    from lightning_heavytail.models import BiasFreeMLP, Classifier

    pl.seed_everything(config.seed, workers=True, verbose=False)
    net = BiasFreeMLP(datamodule.in_features, datamodule.num_classes, width=config.width, depth=1)
    model = Classifier(net, num_classes=datamodule.num_classes, lr=config.lr)
    callbacks: list[Any] = [
        PruneEvalCallback(sparsities=DEMO_SPARSITIES, method=("neuron", "global"), params="paper", epsilon=_EPSILON,
                          every_n_epochs=eval_every(config.epochs))
    ]
    if name == "heavytail":
        callbacks.append(
            HeavyTailNoiseCallback(alpha=config.alpha, sigma=config.sigma, structure=config.structure,  # type: ignore[arg-type]
                                   params="paper", seed=config.seed)
        )
    logger = TensorBoardLogger(config.out, name=name, version=version, default_hp_metric=False)
    steps = max(1, math.ceil(len(datamodule.data.train) / config.batch_size))
    trainer = _trainer(config, logger, callbacks, steps)
    trainer.fit(model, datamodule=datamodule)
    history_file = Path(config.out) / name / f"version_{version}" / "prune_eval.json"
    if not trainer.is_global_zero:
        return {}, False
    history = json.loads(history_file.read_text())["history"]
    return history[-1], True


def _summary(entry: dict[str, Any], name: str, log_dir: str, noise: dict[str, Any] | None) -> dict[str, Any]:
    curve = entry["curves"]["neuron"]
    report = entry["compressibility"]
    compress = {
        "fraction_prunable": report["fraction_prunable/total"],
        "epsilon": _EPSILON,
        **{key[: -len("/total")]: value for key, value in report.items() if key.endswith("/total") and
           not key.startswith("fraction_prunable")},
        "alpha_mohammadi": report.get("alpha_mohammadi/mean", math.nan),
        "alpha_hill": report.get("alpha_hill/mean", math.nan),
    }
    return {
        "name": name,
        "method": "neuron",
        "epoch": entry["epoch"],
        "global_step": entry["global_step"],
        "requested": curve["requested"],
        "sparsity": curve["sparsities"],
        "accuracy": curve["metrics"]["accuracy"],
        "compressibility": compress,
        "auc": entry["auc"]["neuron"],
        "global": {
            "requested": entry["curves"]["global"]["requested"],
            "sparsity": entry["curves"]["global"]["sparsities"],
            "accuracy": entry["curves"]["global"]["metrics"]["accuracy"],
            "auc": entry["auc"]["global"],
        },
        "noise": noise,
        "log_dir": log_dir,
    }


def _table(results: dict[str, Any]) -> str:
    """The side-by-side table printed by the demo."""
    van, ht = results["vanilla"], results["heavytail"]
    lines = [
        "test accuracy under neuron pruning (hidden units with the smallest l2 norm zeroed)",
        f"{'sparsity':>10} | {'vanilla':>9} | {'heavytail':>9} | {'difference':>10}",
        f"{'-' * 10}-+-{'-' * 9}-+-{'-' * 9}-+-{'-' * 10}",
    ]
    for level, a, b in zip(van["requested"], van["accuracy"], ht["accuracy"], strict=True):
        lines.append(f"{level:>10.2f} | {a:>9.4f} | {b:>9.4f} | {b - a:>+10.4f}")
    lines += [
        "",
        "compressibility of the hidden layer",
        f"{'metric':>27} | {'vanilla':>9} | {'heavytail':>9}",
        f"{'-' * 27}-+-{'-' * 9}-+-{'-' * 9}",
    ]
    rows = [("fraction prunable (eps 0.1)", "fraction_prunable")]
    rows += [(f"best-k error {k.split('@')[1]}", k) for k in van["compressibility"] if k.startswith("best_k_error@")
             and k.split("@")[1] in ("0.90", "0.99")]
    rows += [("alpha (Mohammadi)", "alpha_mohammadi"), ("alpha (Hill)", "alpha_hill")]
    for label, key in rows:
        lines.append(f"{label:>27} | {van['compressibility'][key]:>9.4f} | {ht['compressibility'][key]:>9.4f}")
    lines.append(f"{'accuracy AUC (neuron)':>27} | {van['auc']:>9.4f} | {ht['auc']:>9.4f}")
    return "\n".join(lines)


def _verdict(results: dict[str, Any]) -> str:
    """Two measured yes/no lines: is the noisy run more compressible, and does it keep more accuracy when pruned."""
    van, ht = results["vanilla"], results["heavytail"]
    fp_v, fp_h = van["compressibility"]["fraction_prunable"], ht["compressibility"]["fraction_prunable"]
    high = [i for i, s in enumerate(van["requested"]) if s >= 0.9]
    acc_v = sum(van["accuracy"][i] for i in high) / len(high)
    acc_h = sum(ht["accuracy"][i] for i in high) / len(high)
    lines = [
        f"heavytail more compressible (fraction prunable {fp_h:.4f} vs {fp_v:.4f}): {'yes' if fp_h > fp_v else 'no'}",
        f"heavytail keeps more accuracy under neuron pruning at sparsity >= 0.9 (mean {acc_h:.4f} vs {acc_v:.4f}):"
        f" {'yes' if acc_h > acc_v else 'no'}",
    ]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for ax, (title, method) in zip(axes, (("neuron pruning (hidden units)", "neuron"),
                                          ("global magnitude pruning", "global")), strict=True):
        for name, style in (("vanilla", "o-"), ("heavytail", "s-")):
            curve = results[name] if method == "neuron" else results[name]["global"]
            ax.plot(curve["sparsity"], curve["accuracy"], style, markersize=4, label=name)
        ax.set_title(title)
        ax.set_xlabel("measured sparsity of the hidden layer")
        ax.set_ylabel("test accuracy")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    cfg = results["config"]
    figure.suptitle(
        f"{cfg['dataset']}, width {cfg['width']}, lr {cfg['lr']:g}, {cfg['epochs']} epochs;"
        f" heavytail: alpha {cfg['alpha']:g}, sigma {cfg['sigma']:g}, {cfg['structure']} noise"
    )
    figure.savefig(path)


def run_demo(config: DemoConfig, *, echo: Callable[[str], None] | None = print) -> dict[str, Any] | None:
    """Train both runs and write the outputs; return the results (None on ranks other than 0).

    Args:
        config: the settings (already checked, e.g. by ``main``).
        echo: where the table and messages go (None: nowhere).

    Returns:
        The content of ``results.json`` on rank 0, None on the other ranks.
    """
    from lightning_heavytail.data import ClassificationDataModule

    _quiet(config.progress)
    out = Path(config.out)
    started = time.perf_counter()
    datamodule = ClassificationDataModule(
        config.dataset, config.data_dir, batch_size=config.batch_size, eval_batch_size=100, seed=config.seed,
        max_train_samples=config.max_train_samples, max_test_samples=config.max_test_samples,
    )
    datamodule.setup("fit")
    entries: dict[str, dict[str, Any]] = {}
    versions: dict[str, int] = {}
    is_zero = True
    for name in RUN_NAMES:
        versions[name] = _next_version(out / name)
        entries[name], is_zero = _train(name, config, datamodule, versions[name])
    if not is_zero:
        return None
    noise = {"alpha": config.alpha, "sigma": config.sigma, "structure": config.structure, "lr_scaling": True,
             "params": "paper", "seed": config.seed}
    results: dict[str, Any] = {"config": config.public()}
    for name in RUN_NAMES:
        results[name] = _summary(entries[name], name, f"{name}/version_{versions[name]}",
                                 noise if name == "heavytail" else None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot(results, out / "pruning_curves.png")
    if echo is not None:
        echo(_table(results))
        echo("")
        echo(_verdict(results))
        echo(f"\nboth runs took {time.perf_counter() - started:.1f} s")
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
    if config.dataset != "digits":
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
