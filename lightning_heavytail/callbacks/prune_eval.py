"""Pruning curves and compressibility metrics while a Lightning model trains.

``PruneEvalCallback`` evaluates the model at several sparsity levels at the end of training epochs and logs the
pruning curve, its area, and the compressibility metrics of Wan et al. (2024). All pruning and all metrics come from the
functional core (``lightning_heavytail.pruning.evaluate_pruning_curve`` and
``lightning_heavytail.compressibility.compressibility_report``); this module only decides *when* to evaluate, *on
which data*, and *where the results go*.

References:
    Y. Wan, M. Barsbey, A. Zaidi, U. Şimşekli, "Implicit Compressibility of Overparametrized Neural Networks Trained
    with Heavy-Tailed SGD", ICML 2024 (arXiv 2306.08125).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from lightning_heavytail._checks import check_int
from lightning_heavytail.compressibility import DEFAULT_REPORT_SPARSITIES, compressibility_report
from lightning_heavytail.pruning import (
    DEFAULT_METRIC_KEY,
    EpsilonPoint,
    ForwardFn,
    OutputKey,
    PruningCurve,
    check_prunable,
    evaluate_at_epsilon,
    evaluate_pruning_curve,
    level_label,
    rng_preserved,
    tensor_view,
    validate_epsilon,
    validate_forward,
    validate_method,
    validate_sparsities,
)
from lightning_heavytail.selection import ParamSelector, validate_exclude, validate_selector

__all__ = ["PruneEvalCallback"]

_STATE_VERSION = 1
_DEFAULT_PREFIX = "pruning"


class PruneEvalCallback(Callback):
    r"""Evaluate pruning curves and compressibility metrics at the end of training epochs.

    At the end of every ``every_n_epochs``-th training epoch, the model is evaluated on ``dataloader`` at each level of
    ``sparsities`` with each pruning ``method`` (see ``evaluate_pruning_curve``), and
    the compressibility metrics of its weights are computed (see
    ``compressibility_report``). The model is never changed: every parameter
    and buffer is bitwise restored, train/eval modes and ``requires_grad`` too, also when the evaluation raises; the
    optimizer state is not touched, so a checkpoint saved in the same epoch holds the unpruned weights.

    What is pruned: by default (``params=None``) the weights the forward pass uses, less the output layer (the last
    weight it uses) and the first conv, as in the paper, for every method and for the compressibility report; the
    list is logged at fit start. A parametrized weight (``torch.nn.utils.parametrizations.weight_norm``) is pruned as
    the effective weight the layer uses.

    At fit start, before the first training step, the evaluation's forward runs once on the first evaluation batch
    (eval mode, no grad, model and RNG left as they were), and what cannot be scored is refused with an error saying
    what the model returned and how to fix it (``output_key``, ``forward_fn``, a regression metric).

    Data, in this order: ``dataloader`` if given, else the ``test_dataloader`` of the datamodule (or of the
    LightningModule), else the validation dataloaders (all of them, one after the other), else a ``ValueError`` at
    setup. Under DDP every rank evaluates every ``world_size``-th batch of the same data, without the duplicates a
    padding ``DistributedSampler`` would add; the metrics are synced by torchmetrics, and every rank evaluates with
    rank 0's buffers (BatchNorm statistics differ between ranks; rank 0's are the ones checkpointed), so every rank
    gets the same curve, equal to the single-process curve of the saved model.

    Logged with ``pl_module.log`` (so ``ModelCheckpoint`` and ``EarlyStopping`` can ``monitor`` them), with
    ``log_prefix="pruning"``:

    - ``pruning/{metric}@{level}`` for the first method and ``pruning/{method}/{metric}@{level}`` for every method,
      per requested level, written with two decimals or as many as the level has (``0.90``, ``0.995``: see
      ``level_names`` and ``lightning_heavytail.pruning.level_label``);
    - ``pruning/{method}/measured_sparsity@{level}``: the measured fraction pruned at that level;
    - ``pruning/auc`` (first method, ``auc_metric``) and ``pruning/{method}/auc``: the area under the metric-vs-measured
      sparsity curve, normalised by the sparsity span (the curve's mean value);
    - the paper's measurement (``epsilon_point=True``), through ``evaluate_at_epsilon`` on the tensors the curves
      prune: ``pruning/at_epsilon/{metric}``, the metric of the model with each layer pruned at its epsilon point (the
      most units of smallest squared norm within ``epsilon`` of its squared Frobenius norm, no fine-tuning);
      ``pruning/at_epsilon/ratio``, the units pruned over all units; ``pruning/at_epsilon/ratio/{name}`` per layer;
    - ``pruning/{key}`` for every key of the compressibility report (``compressibility=True``).

    With a ``TensorBoardLogger``, a figure of every method's curves (one line per evaluated epoch, the epsilon point a
    star) goes to the images tab under ``pruning/{method}/curve``. The history is written after every evaluation as
    ``{history_stem}.json`` and ``.csv`` into ``trainer.log_dir`` (``default_root_dir`` without a logger):
    ``prune_eval.json`` with the default prefix, ``prune_eval_{log_prefix}.json`` with another. Two
    PruneEvalCallbacks with the same ``log_prefix`` (or the same history files) are refused at setup.

    Args:
        sparsities: strictly increasing levels in ``[0, 1)``.
        method: ``"global"``, ``"layerwise"``, ``"neuron"`` or ``"structured"``, or a sequence of them (one curve each;
            the first one feeds the short names and ``pruning/auc``).
        dataloader: any re-iterable of batches (a ``DataLoader``, a list of batches). ``None``: see "Data" above.
        metrics: a torchmetrics ``Metric`` or ``MetricCollection``; ``None``: multiclass accuracy with the number of
            classes taken from the model's output, logged as ``accuracy``.
        every_n_epochs: evaluate after every n-th training epoch (epochs ``n-1, 2n-1, ...``, zero-based).
        params: which tensors are pruned, as in ``select_parameters`` (on ``lightning_heavytail.pruning.tensor_view``);
            ``None``: see "What is pruned" above; ``"weights"`` includes the output layer and the first conv.
        exclude: glob patterns of parameter names to leave unpruned.
        forward_fn: ``forward_fn(model, batch) -> (preds, target)`` for batches that are not ``(x, y)``.
        output_key: read the predictions as ``model(x)[output_key]`` when the model returns a dict (``"logits"``) or a
            tuple (an index); only without ``forward_fn``.
        epsilon: relative squared-norm budget of the epsilon point and of the "fraction prunable" measure, in
            ``[0, 1]`` (0.1 in the authors' code).
        report_sparsities: levels of the best-k error in the compressibility report; ``None``: the nonzero levels of
            ``sparsities``.
        log_prefix: prefix of every logged name.
        compressibility: compute and log the compressibility report.
        epsilon_point: evaluate and log the model pruned at the epsilon point (one more pass over the data).
        log_figure: send the curve figure to every ``TensorBoardLogger``.
        filename: base name of the JSON and CSV files written into the run directory (followed by the prefix when it
            is not the default, see ``history_stem``); ``None`` writes no files.
        auc_metric: metric whose area is logged as ``pruning/auc`` and ``pruning/{method}/auc``; ``None``:
            ``"accuracy"`` for the default metric, else the first key of the curve's metrics.

    Raises:
        ValueError: at construction, for a bad argument (the message names it, the allowed values and the value given);
            at setup, if there is no evaluation data or another PruneEvalCallback has the same ``log_prefix``; at fit
            start, before the first training step, if the model's output cannot be scored, ``auc_metric`` is not a
            computed metric, nothing is selected for pruning, or ``method="structured"`` and torch-pruning cannot
            trace the model (the message names the layer and suggests another method), or under DDP the data has
            fewer batches than ranks; at an evaluation, if pruning makes the predictions NaN.
        TypeError: at construction, for an argument of the wrong type.

    Examples:
        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import LightningModule, Trainer
        >>> class Net(LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return nn.functional.cross_entropy(self(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> _ = torch.manual_seed(0)
        >>> data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
        >>> callback = PruneEvalCallback(sparsities=(0.0, 0.5, 0.9), dataloader=DataLoader(data, batch_size=32))
        >>> trainer = Trainer(max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False,
        ...                   default_root_dir=tempfile.mkdtemp())
        >>> trainer.fit(Net(), DataLoader(data, batch_size=16))
        >>> [entry["epoch"] for entry in callback.history]
        [0, 1]
        >>> callback.history[-1]["curves"]["global"]["requested"]
        [0.0, 0.5, 0.9]
        >>> sorted(name for name in trainer.callback_metrics if name.startswith("pruning/accuracy@"))
        ['pruning/accuracy@0.00', 'pruning/accuracy@0.50', 'pruning/accuracy@0.90']
        >>> PruneEvalCallback(sparsities=(0.5, 0.2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...sparsities...
    """

    def __init__(
        self,
        sparsities: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
        method: str | Sequence[str] = "global",
        dataloader: Iterable[Any] | None = None,
        metrics: Metric | MetricCollection | None = None,
        every_n_epochs: int = 1,
        *,
        params: ParamSelector | None = None,
        exclude: Sequence[str] = (),
        forward_fn: ForwardFn | None = None,
        output_key: OutputKey | None = None,
        epsilon: float = 0.1,
        report_sparsities: Sequence[float] | None = None,
        log_prefix: str = _DEFAULT_PREFIX,
        compressibility: bool = True,
        epsilon_point: bool = True,
        log_figure: bool = True,
        filename: str | None = "prune_eval",
        auc_metric: str | None = None,
    ) -> None:
        super().__init__()
        self.sparsities: tuple[float, ...] = validate_sparsities(sparsities, "sparsities")
        self.methods: tuple[str, ...] = validate_method(method, "method")
        _check_dataloader(dataloader)
        if metrics is not None and not isinstance(metrics, (Metric, MetricCollection)):
            raise TypeError(
                "`metrics` must be None, a torchmetrics Metric or a torchmetrics MetricCollection,"
                f" got {type(metrics).__name__}: {metrics!r}"
            )
        check_int(every_n_epochs, "every_n_epochs", minimum=1)
        if params is not None:
            validate_selector(params, "params")
        exclude = validate_exclude(exclude)
        validate_forward(forward_fn, output_key)
        epsilon = validate_epsilon(epsilon)
        if report_sparsities is None:
            report_levels = tuple(level for level in self.sparsities if level > 0.0) or DEFAULT_REPORT_SPARSITIES
        else:
            report_levels = validate_sparsities(report_sparsities, "report_sparsities")
        if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
            raise ValueError(f"`log_prefix` must be a non-empty string not ending in '/', got {log_prefix!r}")
        for name, flag in (("compressibility", compressibility), ("epsilon_point", epsilon_point),
                           ("log_figure", log_figure)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True or False, got {flag!r}")
        if filename is not None and (
            not isinstance(filename, str) or not filename or os.sep in filename or "/" in filename
        ):
            raise ValueError(f"`filename` must be None or a non-empty file name without a directory, got {filename!r}")
        if auc_metric is not None and (not isinstance(auc_metric, str) or not auc_metric):
            raise ValueError(f"`auc_metric` must be None or a metric name (a non-empty str), got {auc_metric!r}")
        known = _metric_names(metrics)
        if auc_metric is not None and known is not None and auc_metric not in known:
            raise ValueError(
                f"`auc_metric` must be one of {sorted(known)!r} (the metrics computed), got {auc_metric!r}"
            )

        self.dataloader = dataloader
        self.metrics = metrics
        self.every_n_epochs = every_n_epochs
        self.params = params
        self.exclude = tuple(exclude)
        self.forward_fn = forward_fn
        self.output_key = output_key
        self.epsilon = float(epsilon)
        self.report_sparsities: tuple[float, ...] = report_levels
        self.log_prefix = log_prefix
        self.compressibility = compressibility
        self.epsilon_point = epsilon_point
        self.log_figure = log_figure
        self.filename = filename
        self.auc_metric = auc_metric
        self.level_names: tuple[str, ...] = tuple(level_label(level) for level in self.sparsities)
        self.history: list[dict[str, Any]] = []

        self._source: str | None = None  # where the evaluation data comes from, resolved at setup
        self._lightning_source: Any = None  # Lightning's _DataLoaderSource when the data comes from Lightning
        self._batches: _ShardedBatches | None = None  # this rank's share of it, built at fit start

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            methods=self.methods, sparsities=self.sparsities, every_n_epochs=self.every_n_epochs, prefix=self.log_prefix
        )

    @property
    def history_stem(self) -> str | None:
        """Base name of the history files; ``None`` with ``filename=None``.

        ``filename`` with the default ``log_prefix``, else ``{filename}_{log_prefix}`` (a ``/`` in the prefix written
        ``_``), so that callbacks with distinct prefixes write distinct files.
        """
        if self.filename is None:
            return None
        if self.log_prefix == _DEFAULT_PREFIX:
            return self.filename
        return f"{self.filename}_{self.log_prefix.replace('/', '_')}"

    @property
    def data_source(self) -> str | None:
        """Where the evaluation data comes from (a short description), known after setup; ``None`` before."""
        return self._source

    # ------------------------------------------------------------------ hooks (thin: one private method each)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._setup(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with rng_preserved(pl_module.device):
            self._prepare(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            with rng_preserved(pl_module.device):
                self._evaluate(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._batches = None  # drop the (possibly rebuilt) dataloaders and their workers

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "history": copy.deepcopy(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [_normalize_entry(entry) for entry in state_dict.get("history", [])]

    # ------------------------------------------------------------------ private

    def _setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the strategy and the other PruneEvalCallbacks, find the evaluation data (without loading it yet)."""
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise ValueError(
                "PruneEvalCallback needs every rank to hold the full model: the strategy must be single-device or"
                f" DDP-family, got {type(trainer.strategy).__name__} (sharded parameters)"
            )
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, PruneEvalCallback):
                continue
            if other.log_prefix == self.log_prefix:
                raise ValueError(
                    f"Two PruneEvalCallbacks have `log_prefix`={self.log_prefix!r}: their logged names and history"
                    " files would overwrite each other. Give each a distinct `log_prefix`."
                )
            if self.history_stem is not None and other.history_stem == self.history_stem:
                raise ValueError(
                    f"Two PruneEvalCallbacks (log_prefix {self.log_prefix!r} and {other.log_prefix!r}) would write the"
                    f" same history files {self.history_stem}.json/.csv. Give them distinct `filename`s."
                )
        self._lightning_source = None
        if self.dataloader is not None:
            self._source = "the `dataloader` argument"
            return
        # Lightning's record of where each loop's dataloaders come from (fit(...) arguments, datamodule or module
        # hooks). The raw loaders are used, not trainer.val_dataloaders: under DDP those carry a DistributedSampler
        # that pads with repeated samples, which would change the metrics.
        for hook, data_source in (
            ("test_dataloader", trainer.test_loop._data_source),
            ("val_dataloader", trainer.fit_loop.epoch_loop.val_loop._data_source),
        ):
            if data_source.is_defined() and data_source.instance is not None:
                self._lightning_source = data_source
                if not data_source.is_module():
                    self._source = "the `val_dataloaders` passed to `trainer.fit`"
                elif data_source.instance is getattr(trainer, "datamodule", None):
                    self._source = f"the datamodule's `{hook}()`"
                else:
                    self._source = f"the LightningModule's `{hook}()`"
                return
        raise ValueError(
            "PruneEvalCallback found no evaluation data: pass `dataloader=` to PruneEvalCallback, or give the"
            " datamodule (or the LightningModule) a `test_dataloader()` or a `val_dataloader()`, or pass"
            " `val_dataloaders=` to `trainer.fit`"
        )

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> _ShardedBatches:
        """Load this rank's share of the evaluation data and check that the model can be pruned as asked."""
        if self._source is None:
            self._setup(trainer, pl_module)
        if self.dataloader is not None:
            loaders: list[Iterable[Any]] = [self.dataloader]
        else:
            loaders = _lightning_loaders(self._lightning_source, self._source)
        batches = _ShardedBatches(loaders, trainer.global_rank, trainer.world_size)
        total = batches.total_batches
        if total is None and trainer.world_size > 1:
            # No length to check: count this rank's batches (one pass) and take the fewest over the ranks, so that
            # every rank raises together rather than one waiting forever in the metric sync.
            mine = torch.tensor(sum(1 for _ in batches), device=pl_module.device)
            fewest = int(trainer.strategy.all_gather(mine).min())
            total = trainer.world_size if fewest > 0 else 0
        if total is not None and total < trainer.world_size:
            # the same on every rank, so every rank raises (a rank without batches would hang the metric sync)
            raise ValueError(
                f"PruneEvalCallback's evaluation data ({self._source}) has {total} batch(es), fewer than the"
                f" {trainer.world_size} ranks; give it at least one batch per rank"
            )
        check = check_prunable(
            pl_module,
            self.methods,
            _first_batch(batches, pl_module.device),
            params=self.params,
            exclude=self.exclude,
            forward_fn=self.forward_fn,
            output_key=self.output_key,
            metrics=self.metrics,
        )
        if self.auc_metric is not None and self.auc_metric not in check.metrics:
            raise ValueError(
                f"`auc_metric` must be one of {sorted(check.metrics)!r} (the metrics computed), got {self.auc_metric!r}"
            )
        left_out = "; ".join(f"{name} ({why})" for name, why in check.left_out.items())
        rank_zero_info(
            f"PruneEvalCallback: {list(self.methods)} at {list(self.sparsities)} on {self._source},"
            f" {trainer.world_size} rank(s); prunes {check.params}" + (f"; leaves out {left_out}" if left_out else "")
        )
        self._batches = batches
        return batches

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate the curves, the epsilon point and the compressibility report; record, log, plot, write them."""
        batches = self._batches if self._batches is not None else self._prepare(trainer, pl_module)
        curves: dict[str, PruningCurve] = {}
        with trainer.precision_plugin.forward_context(), _rank_zero_buffers(pl_module, trainer.world_size):
            for method in self.methods:
                curves[method] = evaluate_pruning_curve(
                    pl_module,
                    batches,
                    self.sparsities,
                    method=method,
                    metrics=self.metrics,
                    forward_fn=self.forward_fn,
                    output_key=self.output_key,
                    params=self.params,
                    exclude=self.exclude,
                    device=pl_module.device,
                )
            pruned = set(curves[self.methods[0]].params)  # the report and the epsilon point: the curves' tensors
            point = None
            if self.epsilon_point:
                point = evaluate_at_epsilon(
                    pl_module,
                    batches,
                    epsilon=self.epsilon,
                    metrics=self.metrics,
                    forward_fn=self.forward_fn,
                    output_key=self.output_key,
                    params=lambda name, _: name in pruned,
                    device=pl_module.device,
                )
        report: dict[str, float] = {}
        if self.compressibility:
            report = compressibility_report(
                tensor_view(pl_module),
                params=lambda name, _: name in pruned,
                sparsities=self.report_sparsities,
                epsilon=self.epsilon,
            )
        auc_metric = self._auc_metric(curves[self.methods[0]])
        entry: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "curves": {method: curve.to_dict() for method, curve in curves.items()},
            "compressibility": {key: float(value) for key, value in report.items()},
            "auc": {method: float(curve.area_under_curve(auc_metric)) for method, curve in curves.items()},
            "auc_metric": auc_metric,
            "at_epsilon": _epsilon_record(point, pl_module) if point is not None else {},
        }
        self.history = [old for old in self.history if old["epoch"] != entry["epoch"]] + [entry]

        for name, value in self._scalars(curves, entry).items():
            # identical on every rank (synced metrics, replicated weights): "max" syncs them exactly
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        if self.filename is not None:
            log_dir = trainer.log_dir  # a broadcast under DDP: every rank must call it
            if trainer.is_global_zero and self.history_stem is not None:
                _write_history(self.history, self.methods, log_dir or trainer.default_root_dir, self.history_stem)
        if self.log_figure and trainer.is_global_zero:
            self._log_figures(trainer)

    def _auc_metric(self, curve: PruningCurve) -> str:
        """The metric whose area is logged: ``auc_metric``, else accuracy (default metric), else the first one."""
        name = self.auc_metric
        if name is None:
            name = DEFAULT_METRIC_KEY if DEFAULT_METRIC_KEY in curve.metrics else next(iter(curve.metrics))
        if name not in curve.metrics:
            raise ValueError(
                f"`auc_metric` must be one of {sorted(curve.metrics)!r} (the metrics computed), got {name!r}"
            )
        return name

    def _scalars(self, curves: dict[str, PruningCurve], entry: dict[str, Any]) -> dict[str, float]:
        """Every logged name and value, see the class docstring."""
        p = self.log_prefix
        out: dict[str, float] = {}

        def put(name: str, value: float) -> None:
            if name in out:
                raise ValueError(f"PruneEvalCallback would log {name!r} twice; rename a metric or change `log_prefix`")
            out[name] = float(value)

        for i, method in enumerate(self.methods):
            curve = curves[method]
            for j, level in enumerate(self.level_names):
                for metric, values in curve.metrics.items():
                    put(f"{p}/{method}/{metric}@{level}", values[j])
                    if i == 0:
                        put(f"{p}/{metric}@{level}", values[j])
                put(f"{p}/{method}/measured_sparsity@{level}", curve.sparsities[j])
            put(f"{p}/{method}/auc", entry["auc"][method])
        put(f"{p}/auc", entry["auc"][self.methods[0]])
        at_epsilon = entry["at_epsilon"]
        if at_epsilon:
            for metric, value in at_epsilon["metrics"].items():
                put(f"{p}/at_epsilon/{metric}", value)
            put(f"{p}/at_epsilon/ratio", at_epsilon["ratio"])
            for name, ratio in at_epsilon["ratios"].items():
                put(f"{p}/at_epsilon/ratio/{name}", ratio)
        for key, value in entry["compressibility"].items():
            put(f"{p}/{key}", value)
        return out

    def _log_figures(self, trainer: Trainer) -> None:
        """Send one figure per method (all evaluated epochs' curves) to every TensorBoardLogger (rank zero only)."""
        tensorboards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not tensorboards:
            return
        # the step Lightning gives the epoch-end scalars logged above, so image and scalars line up in TensorBoard
        step = int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)) - 1
        for method in self.methods:
            image = _render_curves(self.history, method, title=f"{self.log_prefix}: {method} pruning")
            for logger in tensorboards:
                logger.experiment.add_image(
                    f"{self.log_prefix}/{method}/curve", image, global_step=step, dataformats="HWC"
                )


# ---------------------------------------------------------------------- evaluation data


@contextlib.contextmanager
def _rank_zero_buffers(module: nn.Module, world_size: int) -> Iterator[None]:
    """Run with global rank 0's buffers on every rank, and each rank's own put back afterwards.

    DDP keeps parameters equal, not buffers: each rank updates BatchNorm's running statistics with its own batches
    after DDP's broadcast at the start of the forward, so they drift apart. Rank 0's are the ones its checkpoints
    save; scoring every shard with them gives the curve of the saved model.
    """
    if world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    buffers = list(module.buffers())
    with torch.no_grad():
        own = [buffer.detach().clone() for buffer in buffers]
    try:
        with torch.no_grad():
            for buffer in buffers:  # the same order on every rank: the same model
                dist.broadcast(buffer, src=0)
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, own, strict=True):
                buffer.copy_(saved)


def _metric_names(metrics: Metric | MetricCollection | None) -> set[str] | None:
    """The names the curve's metrics will have, where they are known before any evaluation."""
    if metrics is None:
        return {DEFAULT_METRIC_KEY}
    if isinstance(metrics, MetricCollection):
        return {str(key) for key in metrics.keys(keep_base=False)}
    return None  # a single Metric may return one value (named after its class) or a dict


def _check_dataloader(dataloader: object) -> None:
    """Raise unless ``dataloader`` is None or a re-iterable (not a one-shot iterator) of batches."""
    if dataloader is None:
        return
    if not isinstance(dataloader, Iterable) or isinstance(dataloader, (str, bytes)):
        raise TypeError(
            f"`dataloader` must be None or an iterable of batches (a DataLoader), got {type(dataloader).__name__}"
        )
    if isinstance(dataloader, Iterator):
        raise ValueError(
            "`dataloader` must be re-iterable (it is read once per sparsity level and epoch), such as a DataLoader or"
            f" a list of batches, got a one-shot iterator {type(dataloader).__name__}"
        )


def _lightning_loaders(data_source: Any, description: str | None) -> list[Iterable[Any]]:
    """The raw (not distributed) dataloaders of the Lightning source found at setup, flattened into a list."""
    try:
        loaders = data_source.dataloader()
    except Exception as err:
        raise RuntimeError(
            f"PruneEvalCallback could not get its evaluation data from {description} during fit: {err!r}. If that"
            " dataset is only built in setup('test') or setup('validate'), build it in setup('fit') too, or pass"
            " `dataloader=` to PruneEvalCallback"
        ) from err
    return [loader for loader in CombinedLoader(loaders, mode="sequential").flattened if loader is not None]


def _shard(loader: Iterable[Any], rank: int, world: int, offset: int = 0) -> Iterable[Any]:
    """This rank's share of ``loader``, whose first batch has the global index ``offset`` among all loaders.

    A plain map-style ``DataLoader`` is rebuilt around a sharded batch sampler, so a rank loads only its own batches
    (a shuffling one in the dataset's order: shuffles drawn on each rank's own RNG would overlap, and the metrics do
    not depend on the order); any other iterable is read in full and its batches kept by global index. A
    ``DataLoader`` that already has a ``DistributedSampler`` is used as it is (the user sharded it).
    """
    if world == 1:
        return loader
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler):
        sampler = loader.sampler
        if not sampler.drop_last and len(sampler.dataset) % sampler.num_replicas != 0:  # type: ignore[arg-type]
            rank_zero_warn(
                "PruneEvalCallback: the evaluation DataLoader has a DistributedSampler that pads the dataset with"
                " repeated samples, so the pruning metrics count them twice; pass a DataLoader without a sampler and"
                " the callback shards it exactly"
            )
        return loader
    if (
        type(loader) is DataLoader
        and loader.batch_sampler is not None
        and not isinstance(loader.dataset, IterableDataset)
    ):
        batch_sampler: Iterable[list[int]] = loader.batch_sampler
        if isinstance(loader.sampler, RandomSampler) and loader.batch_size is not None:
            dataset: Any = loader.dataset  # map-style, so sized
            batch_sampler = BatchSampler(SequentialSampler(dataset), loader.batch_size, loader.drop_last)
        kwargs: dict[str, Any] = {
            "batch_sampler": _ShardBatchSampler(batch_sampler, rank, world, offset),
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "generator": loader.generator,
            "persistent_workers": loader.persistent_workers,
            "pin_memory_device": loader.pin_memory_device,
        }
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        if hasattr(loader, "in_order"):
            kwargs["in_order"] = loader.in_order
        return DataLoader(loader.dataset, **kwargs)
    return _EveryNth([loader], rank, world, offset)


class _EveryNth:
    """Re-iterable view of the batches of ``loaders`` (one after the other) whose global index falls to ``rank``."""

    def __init__(self, loaders: Sequence[Iterable[Any]], rank: int, world: int, offset: int = 0) -> None:
        self.loaders = loaders
        self.rank = rank
        self.world = world
        self.offset = offset

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(itertools.chain.from_iterable(self.loaders), start=self.offset):
            if i % self.world == self.rank:
                yield batch


class _ShardBatchSampler(_EveryNth):
    """A batch sampler's batches whose global index falls to ``rank``, with a length (DataLoader asks for one)."""

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int, world: int, offset: int = 0) -> None:
        super().__init__([batch_sampler], rank, world, offset)
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        first = (self.rank - self.offset) % self.world
        return len(range(first, len(self.batch_sampler), self.world))  # type: ignore[arg-type]


class _ShardedBatches:
    """This rank's share of one or more loaders, read one after the other; re-iterable.

    Batches are dealt to ranks by their index over all loaders together, so every rank gets a batch whenever there
    are at least as many batches as ranks, however they are split between loaders.
    """

    def __init__(self, loaders: Sequence[Iterable[Any]], rank: int, world: int) -> None:
        lengths = [_length(loader) for loader in loaders]
        self.total_batches: int | None = None if None in lengths else sum(n for n in lengths if n is not None)
        self.parts: list[Iterable[Any]]
        if self.total_batches is None:
            self.parts = [_EveryNth(loaders, rank, world)] if world > 1 else list(loaders)
        else:
            offsets = itertools.accumulate([0, *(n for n in lengths if n is not None)])
            self.parts = [_shard(loader, rank, world, offset) for loader, offset in zip(loaders, offsets, strict=False)]

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part


def _length(loader: Iterable[Any]) -> int | None:
    """Number of batches of ``loader`` over all ranks, ``None`` if it has no length."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _first_batch(batches: Iterable[Any], device: torch.device) -> Any:
    """This rank's first evaluation batch, on ``device`` (fit start runs the evaluation's forward on it)."""
    for batch in batches:
        return move_data_to_device(batch, device)
    return None


# ---------------------------------------------------------------------- names, history, files, figures


def _epsilon_record(point: EpsilonPoint, model: nn.Module) -> dict[str, Any]:
    """The epsilon point for the history: ``EpsilonPoint.to_dict()`` and where it lies on the curves' x-axes.

    ``sparsity``: the fraction of the pruned tensors' entries it zeroes (the mask methods' x-axis); ``removed``: the
    fraction of all the model's parameters it zeroes (the ``"structured"`` x-axis). A unit holds ``numel / units``
    entries, so a layer pruned at ratio ``r`` loses ``r * numel`` of them.
    """
    sizes = {name: tensor.numel() for name, tensor in tensor_view(model).named_parameters()}
    zeroed = sum(ratio * sizes[name] for name, ratio in point.ratios.items())
    return {
        **point.to_dict(),
        "sparsity": zeroed / sum(sizes[name] for name in point.ratios),
        "removed": zeroed / sum(p.numel() for p in model.parameters()),
    }


def _normalize_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A history entry with every field present (defaults for fields a checkpoint of an older version lacks)."""
    out = dict(entry)
    out.setdefault("epoch", -1)
    out.setdefault("global_step", -1)
    out.setdefault("curves", {})
    out.setdefault("compressibility", {})
    out.setdefault("auc", {})
    out.setdefault("auc_metric", DEFAULT_METRIC_KEY)
    out.setdefault("at_epsilon", {})
    return out


def _write_history(history: list[dict[str, Any]], methods: Sequence[str], directory: str, filename: str) -> None:
    """Write ``{filename}.json`` (everything) and ``{filename}.csv``.

    The CSV has one row per epoch, method and level, and one per epoch for the epsilon point (method ``at_epsilon``,
    ``requested`` the epsilon, ``sparsity`` the fraction of the pruned entries it zeroes, ``epsilon_ratio`` the
    fraction of units).
    """
    fs = get_filesystem(directory)
    fs.makedirs(directory, exist_ok=True)
    with fs.open(os.path.join(directory, f"{filename}.json"), "w") as f:
        json.dump({"methods": list(methods), "history": history}, f, indent=1)

    metric_names: list[str] = []
    for entry in history:
        for curve in [*entry["curves"].values(), entry["at_epsilon"]]:
            metric_names += [name for name in curve.get("metrics", {}) if name not in metric_names]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["epoch", "global_step", "method", "requested", "sparsity", *metric_names, "epsilon_ratio"])
    for entry in history:
        for method, curve in entry["curves"].items():
            for j, (requested, measured) in enumerate(zip(curve["requested"], curve["sparsities"], strict=True)):
                values = [curve["metrics"][name][j] if name in curve["metrics"] else "" for name in metric_names]
                writer.writerow([entry["epoch"], entry["global_step"], method, requested, measured, *values, ""])
        point = entry["at_epsilon"]
        if point:
            values = [point["metrics"].get(name, "") for name in metric_names]
            writer.writerow([entry["epoch"], entry["global_step"], "at_epsilon", point["epsilon"], point["sparsity"],
                             *values, point["ratio"]])
    with fs.open(os.path.join(directory, f"{filename}.csv"), "w") as f:
        f.write(buffer.getvalue())


def _curves_figure(history: list[dict[str, Any]], method: str, title: str) -> Any:
    """A matplotlib Figure of ``method``'s curves, one line per evaluated epoch, its epsilon point as a star.

    The star sits at the epsilon point's accuracy (or other metric) and at its place on this method's x-axis: the
    fraction of the pruned entries it zeroes, or for ``"structured"`` the fraction of all parameters.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    entries = [entry for entry in history if method in entry["curves"]]
    metric_names = list(entries[-1]["curves"][method]["metrics"]) if entries else []
    figure = Figure(figsize=(4.5 * max(1, len(metric_names)), 3.6), dpi=80, layout="constrained")
    axes = figure.subplots(1, max(1, len(metric_names)), squeeze=False)[0]
    epochs = [entry["epoch"] for entry in entries]
    norm = Normalize(vmin=min(epochs, default=0), vmax=max(max(epochs, default=0), min(epochs, default=0) + 1))
    cmap = "viridis"
    mappable = ScalarMappable(norm=norm, cmap=cmap)
    x_key = "removed" if method == "structured" else "sparsity"
    for ax, name in zip(axes, metric_names, strict=False):
        starred = False
        for entry in entries:
            curve, point, color = entry["curves"][method], entry["at_epsilon"], mappable.to_rgba(entry["epoch"])
            if name in curve["metrics"]:
                ax.plot(curve["sparsities"], curve["metrics"][name], marker="o", markersize=3, color=color,
                        label=f"epoch {entry['epoch']}")
            if point and name in point["metrics"]:
                ax.plot([point[x_key]], [point["metrics"][name]], marker="*", markersize=12, linestyle="none",
                        color=color, markeredgecolor="black",
                        label=None if starred else f"epsilon point (epsilon={point['epsilon']:g})")
                starred = True
        ax.set_xlabel("measured sparsity")
        ax.set_ylabel(name)
        ax.set_xlim(0.0, 1.0)
        ax.grid(alpha=0.3)
    if len(entries) <= 6:
        axes[0].legend(fontsize="small")
    else:
        figure.colorbar(mappable, ax=list(axes), label="epoch")
    figure.suptitle(title)
    return figure


def _render_curves(history: list[dict[str, Any]], method: str, title: str) -> Any:
    """``_curves_figure`` as an RGB image (H, W, 3 uint8 array), drawn with Agg (no display, no pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(_curves_figure(history, method, title))
    canvas.draw()  # type: ignore[no-untyped-call]
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # type: ignore[no-untyped-call]
