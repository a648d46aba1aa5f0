"""The runs of ``lightning-heavytail demo``: training to the stopping rule, measuring, writing the outputs.

``run_demo(config)`` trains, for each seed, a vanilla and a heavy-tailed run (``train_run``) and writes under
``config.out``:

- ``vanilla/version_N/seed_S`` and ``heavytail/version_N/seed_S``: TensorBoard logs (``tensorboard --logdir runs``),
  each run's ``hparams.yaml`` (the vanilla run says ``demo/noise: none`` and ``heavytail/sigma: 0``; the heavy-tailed
  run carries ``HeavyTailNoiseCallback.hparams()``), ``prune_eval.json`` / ``prune_eval.csv``;
- ``pruning_curves.png``: the mean neuron and global pruning curves, epsilon points marked;
- ``results.json``: ``config`` (the settings, the hardware as resolved by Lightning, the command line that repeats
  the run, the data sizes and package versions); ``vanilla`` and ``heavytail``, each with the neuron curve
  (``sparsity``, ``accuracy``), ``compressibility`` (``fraction_prunable`` ...) as means over the seeds and the
  per-seed ``runs``; ``summary.<run>.<metric> = {"mean", "std", "values"}`` for ``accuracy`` (unpruned test
  accuracy), ``epsilon_ratio``, ``epsilon_accuracy``, ``steps``, and ``summary.vanilla.accuracy_at_heavytail_ratio``.

Every number printed or written is measured by the run; nothing is hard-coded. While it trains, one line per run on
stderr shows which run and seed, the epoch, the training accuracy the stopping rule checks, and the pruning
evaluation (``DemoProgressBar``; ``quiet=True`` turns it off).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from typing_extensions import override

from lightning_heavytail._demo_report import RUN_NAMES, mean_run, plot, run_record, summarize, tables, verdict
from lightning_heavytail.callbacks.noise import HeavyTailNoiseCallback
from lightning_heavytail.callbacks.prune_eval import PruneEvalCallback
from lightning_heavytail.cli import DEMO_SPARSITIES, EPSILON, DemoConfig
from lightning_heavytail.data import ClassificationDataModule
from lightning_heavytail.known_warnings import ignore_known_warnings
from lightning_heavytail.models import BiasFreeMLP, Classifier, MeanFieldMLP
from lightning_heavytail.pruning import evaluate_at_epsilon, evaluate_at_ratios

__all__ = [
    "DemoProgressBar",
    "FinalPruneEvalCallback",
    "StoppingRuleData",
    "demo_datamodule",
    "demo_output",
    "resolved_hardware",
    "run_demo",
    "train_run",
]

TRAIN_METRIC = "train_full"
"""The stopping rule's metric prefix: the accuracy on the full training set (``train_full/accuracy``)."""


class DemoProgressBar(ProgressBar):
    """One line per run on stderr: the run and seed, the epoch, the stopping rule's training accuracy, pruning.

    Full-batch training has one step per epoch, so Lightning's per-epoch bars would say nothing; this line counts
    epochs (and batches, when there are several), shows ``train_full/accuracy`` after each check against the
    threshold, and what ``FinalPruneEvalCallback`` is doing, batch by batch. It stays on screen when the run ends. Only
    rank 0 shows it (``ProgressBar.setup`` disables the others).
    """

    def __init__(self, label: str, stop_at: float) -> None:
        super().__init__()
        self.label = label
        self.stop_at = stop_at
        self._enabled = True
        self._bar: tqdm[Any] | None = None
        self._epoch_text = "starting"
        self._shown_at = 0.0

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    def status(self, text: str | None = None, *, force: bool = True) -> None:
        """Show the epoch line, and ``text`` after it (at most every 0.2 s unless ``force``)."""
        if self._bar is None:
            return
        self._bar.set_description_str(f"{self.label}: {self._epoch_text}" + (f" | {text}" if text else ""),
                                      refresh=False)
        if force or time.monotonic() - self._shown_at > 0.2:
            self._bar.refresh()
            self._shown_at = time.monotonic()

    def pruning_progress(self, description: str, done: int, total: int | None) -> None:
        """``PruneEvalCallback``'s batches as it evaluates them (it calls this on the trainer's progress bar)."""
        self.status(f"{description}: batch {done}/{total if total is not None else '?'}", force=done == total)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled:
            self._bar = tqdm(file=sys.stderr, bar_format="{desc} [{elapsed}]", dynamic_ncols=True, leave=True)
        self.status()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        total = self.total_train_batches
        if isinstance(total, int) and total > 1:
            self.status(f"batch {batch_idx + 1}/{total}", force=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the epoch's validation loop: the stopping rule's accuracy of this epoch is in callback_metrics
        accuracy = trainer.callback_metrics.get(f"{TRAIN_METRIC}/accuracy")
        checked = f"training accuracy {float(accuracy):.4f}" if accuracy is not None else "training accuracy -"
        self._epoch_text = (f"epoch {trainer.current_epoch + 1}, step {trainer.global_step},"
                            f" {checked} (stops above {self.stop_at:g})")
        self.status()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()  # also after an exception

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class FinalPruneEvalCallback(PruneEvalCallback):
    """``PruneEvalCallback`` that evaluates once, after the final epoch of the fit (with ``every_n_epochs=1``).

    The final epoch is the one at which ``EarlyStopping`` stopped training (it checks in the validation loop, which
    runs before ``on_train_epoch_end``, so ``trainer.should_stop`` is already set) or the last of ``max_epochs``.
    Evaluating the curves at every check of the stopping rule cost the demo more than the training itself. It tells
    a ``DemoProgressBar`` when it starts and what it found. A module-level class, so that ``ddp_spawn`` can pickle it.
    """

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (trainer.should_stop or trainer.current_epoch + 1 >= (trainer.max_epochs or 0)):
            return
        bar = trainer.progress_bar_callback
        show = bar.status if isinstance(bar, DemoProgressBar) else (lambda text: None)
        show(f"pruning: evaluating {' and '.join(self.methods)} pruning at {len(self.sparsities)} sparsities"
             f" and the epsilon point ...")
        started = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        found = [(label, trainer.callback_metrics.get(key)) for label, key in (
            ("accuracy AUC", "pruning/auc"), ("epsilon ratio", "pruning/at_epsilon/ratio"),
            ("accuracy at the epsilon point", "pruning/at_epsilon/accuracy"))]
        show("pruning: " + ", ".join(f"{label} {float(value):.4f}" for label, value in found if value is not None)
             + f" ({time.perf_counter() - started:.1f} s)")


class StoppingRuleData(pl.LightningDataModule):
    """A ``ClassificationDataModule``'s training batches, with its training set in order as the validation data.

    The validation loop then scores the full training set, which is what the paper's stopping rule checks
    (``EarlyStopping`` on ``train_full/accuracy``, see ``Classifier``). The loaders are built in each process, so
    ``ddp_spawn`` pickles tensors, not the training loader's ``torch.Generator``. ``hparams`` describe the run;
    Lightning logs them with the module's (TensorBoard's HParams tab, ``hparams.yaml``).
    """

    def __init__(self, data: ClassificationDataModule, hparams: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.data = data
        if hparams:
            self.save_hyperparameters(hparams)

    @override
    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return self.data.train_dataloader()

    @override
    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return self.data.train_eval_dataloader()


@contextmanager
def demo_output() -> Iterator[None]:
    """Lightning's info messages and ``KNOWN_WARNINGS`` off while the demo runs (its own progress says more)."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning_heavytail")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with ignore_known_warnings():
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _trainer(config: DemoConfig, logger: Any, callbacks: list[Any], steps_per_epoch: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=config.strategy,
        logger=logger,
        callbacks=callbacks,
        check_val_every_n_epoch=config.check_every,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        num_sanity_val_steps=0,
        default_root_dir=config.out,
    )


def resolved_hardware(config: DemoConfig) -> dict[str, Any]:
    """What Lightning makes of ``--accelerator/--devices/--strategy`` here (builds a Trainer, trains nothing).

    Returns:
        ``accelerator`` (``"cpu"``, ``"cuda"``, ...), ``devices`` (the count, or the list of indices if a list was
        asked for), ``device_ids``, ``num_nodes``, ``world_size`` and ``strategy`` (the flag, or for ``auto`` the
        strategy Lightning chose, e.g. ``"single_device"``).

    Raises:
        Exception: whatever Lightning raises for flags it refuses (e.g. ``--accelerator cuda`` without a GPU).
    """
    with demo_output():  # no "GPU available: ..." messages
        trainer = _trainer(config, logger=False, callbacks=[], steps_per_epoch=1)
    strategy = trainer.strategy
    return {
        "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
        "devices": list(trainer.device_ids) if isinstance(config.devices, list) else trainer.num_devices,
        "device_ids": list(trainer.device_ids),
        "num_nodes": trainer.num_nodes,
        "world_size": trainer.world_size,
        "strategy": config.strategy if config.strategy != "auto" else getattr(strategy, "strategy_name",
                                                                               type(strategy).__name__),
    }


def _network(config: DemoConfig, datamodule: ClassificationDataModule) -> nn.Module:
    if config.model == "meanfield":
        return MeanFieldMLP(datamodule.in_features, datamodule.num_classes, width=config.width)
    return BiasFreeMLP(datamodule.in_features, datamodule.num_classes, width=config.width, depth=1)


def demo_datamodule(config: DemoConfig) -> ClassificationDataModule:
    """The demo's ``ClassificationDataModule``, loaded; ``batch_size`` None becomes the whole training set."""
    datamodule = ClassificationDataModule(
        config.dataset, config.data_dir, batch_size=config.batch_size or 1, eval_batch_size=100, seed=config.seed,
        max_train_samples=config.max_train_samples, max_test_samples=config.max_test_samples,
    )
    datamodule.setup("fit")
    if config.batch_size is None:
        datamodule.batch_size = len(datamodule.data.train)  # full batch
    return datamodule


def _run_hparams(name: str, seed: int, config: DemoConfig) -> dict[str, Any]:
    """What tells the runs apart in TensorBoard, besides the module's and (heavy-tailed run) the noise callback's."""
    hparams: dict[str, Any] = {"demo/run": name, "demo/seed": seed, "demo/model": config.model,
                               "demo/dataset": config.dataset, "demo/width": config.width,
                               "demo/stop_at": config.stop_at, "demo/command": config.command()}
    if name == "vanilla":  # stated, not left out: no noise callback, plain SGD
        hparams.update({"demo/noise": "none (plain SGD)", "heavytail/sigma": 0.0})
    else:
        hparams["demo/noise"] = "HeavyTailNoiseCallback (heavytail/*)"
    return hparams


def train_run(name: str, seed: int, config: DemoConfig, datamodule: ClassificationDataModule,
              version: int = 0, label: str | None = None) -> tuple[nn.Module | None, dict[str, Any]]:
    """Train one run of the demo to the stopping rule and measure it (used by ``run_demo`` and the sweep script).

    Args:
        name: ``"vanilla"`` or ``"heavytail"`` (with ``HeavyTailNoiseCallback``).
        seed: the run's seed (initialization, training order, noise).
        config: the demo's settings (``config.quiet`` False: a ``DemoProgressBar`` on stderr).
        datamodule: from ``demo_datamodule(config)``.
        version: TensorBoard version directory under ``config.out/name``.
        label: the progress line's name of the run (default ``"{name}, seed {seed}"``).

    Returns:
        On rank 0, the trained network and the run's record (final pruning evaluation, epsilon point, steps);
        on other ranks ``(None, {})``.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    model = Classifier(_network(config, datamodule), num_classes=datamodule.num_classes, lr=config.learning_rate,
                       val_name=TRAIN_METRIC)
    callbacks: list[Any] = [] if config.quiet else [DemoProgressBar(label or f"{name}, seed {seed}", config.stop_at)]
    callbacks += [
        FinalPruneEvalCallback(
            sparsities=DEMO_SPARSITIES, method=("neuron", "global"), params="paper", epsilon=EPSILON,
            every_n_epochs=1, dataloader=datamodule.test_dataloader(),
        ),
        # the paper's stopping rule: accuracy on the full training set above the threshold
        EarlyStopping(monitor=f"{TRAIN_METRIC}/accuracy", mode="max", stopping_threshold=config.stop_at,
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
    trainer.fit(model, datamodule=StoppingRuleData(datamodule, _run_hparams(name, seed, config)))
    log_dir = trainer.log_dir  # a broadcast under DDP: every rank must call it
    if not trainer.is_global_zero:
        return None, {}
    history = json.loads((Path(log_dir or config.out) / "prune_eval.json").read_text())["history"]
    entry = history[-1]
    net = model.net
    point = evaluate_at_epsilon(net, datamodule.test_dataloader(), epsilon=EPSILON, params="paper")
    if entry["compressibility"]["fraction_prunable/total"] != point.ratio:  # same rule, same weights: must agree
        raise RuntimeError(f"{name} seed {seed}: the last pruning evaluation (epoch {entry['epoch']}) is not of the"
                           " final model")
    train_accuracy = float(trainer.callback_metrics[f"{TRAIN_METRIC}/accuracy"])
    record = run_record(entry, seed, Path(log_dir).relative_to(config.out).as_posix() if log_dir else "",
                        train_accuracy, config.stop_at, point.to_dict())
    return net, record


def _next_version(directory: Path) -> int:
    versions = [int(p.name[8:]) for p in directory.glob("version_*") if p.name[8:].isdigit()]
    return max(versions, default=-1) + 1


def _versions() -> dict[str, str]:
    from lightning_heavytail import __version__

    out = {"python": platform.python_version(), "platform": platform.platform(), "lightning-heavytail": __version__}
    for package in ("torch", "lightning", "torchmetrics", "torch-pruning", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _result_line(name: str, record: dict[str, Any], seconds: float) -> str:
    point = record["epsilon_point"]
    return (f"  {name}, seed {record['seed']}: {record['global_step']} steps,"
            f" test accuracy {record['accuracy'][0]:.4f}, epsilon ratio {point['ratio']:.4f},"
            f" accuracy at the epsilon point {point['metrics']['accuracy']:.4f} ({seconds:.1f} s)")


def run_demo(config: DemoConfig, *, echo: Callable[[str], None] | None = print) -> dict[str, Any] | None:
    """Train every run and write the outputs; return the results (None on ranks other than 0).

    Args:
        config: the settings (already checked, e.g. by ``lightning_heavytail.cli.main``).
        echo: where the tables and messages go (None: nowhere). Progress goes to stderr unless ``config.quiet``.

    Returns:
        The content of ``results.json`` on rank 0, None on the other ranks.
    """
    def progress(text: str) -> None:
        if not config.quiet:
            print(text, file=sys.stderr, flush=True)

    with demo_output():
        out = Path(config.out)
        started = time.perf_counter()
        hardware = resolved_hardware(config)
        datamodule = demo_datamodule(config)
        total = len(RUN_NAMES) * config.seeds
        progress(f"{config.dataset}: {len(datamodule.data.train)} training and {len(datamodule.data.test)} test"
                 f" samples; {total} runs ({', '.join(RUN_NAMES)} x {config.seeds} seed(s)), each until the training"
                 f" accuracy exceeds {config.stop_at:g} (at most {config.epochs} epochs)")
        versions = {name: _next_version(out / name) for name in RUN_NAMES}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in RUN_NAMES}
        for seed in config.seed_list():
            nets: dict[str, nn.Module] = {}
            for name in RUN_NAMES:
                run_started = time.perf_counter()
                index = sum(len(r) for r in runs.values()) + 1
                net, record = train_run(name, seed, config, datamodule, versions[name],
                                        label=f"[{index}/{total}] {name}, seed {seed}")
                if net is None:
                    return None  # not rank 0
                nets[name] = net
                runs[name].append(record)
                progress(_result_line(name, record, time.perf_counter() - run_started))
            ratios = runs["heavytail"][-1]["epsilon_point"]["ratios"]
            at_ratio = evaluate_at_ratios(nets["vanilla"], datamodule.test_dataloader(), ratios)
            runs["vanilla"][-1]["accuracy_at_heavytail_ratio"] = at_ratio["accuracy"]
        noise = {"alpha": config.alpha, "sigma": config.sigma, "structure": config.structure, "lr_scaling": True,
                 "params": "paper", "seeds": config.seed_list()}
        requested = {"accelerator": config.accelerator, "devices": config.devices, "strategy": config.strategy}
        data = {"train_samples": len(datamodule.data.train), "test_samples": len(datamodule.data.test),
                "batch_size": datamodule.batch_size, "in_features": datamodule.in_features,
                "num_classes": datamodule.num_classes}
        results: dict[str, Any] = {"config": {**config.public(), **hardware, "requested": requested, "data": data,
                                              "versions": _versions()}}
        for name in RUN_NAMES:
            results[name] = mean_run(name, runs[name], noise if name == "heavytail" else None)
        results["summary"] = summarize(results)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, out / "pruning_curves.png")
    if echo is not None:
        echo(tables(results))
        echo("")
        echo(verdict(results))
        echo(f"\n{total} runs took {time.perf_counter() - started:.1f} s")
        echo(f"results: {out / 'results.json'}")
        echo(f"pruning curves: {out / 'pruning_curves.png'}")
        echo(f"TensorBoard: tensorboard --logdir {out}")
    return results
