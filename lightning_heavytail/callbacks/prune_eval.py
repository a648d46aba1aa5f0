"""Pruning curves and compressibility metrics while a Lightning model trains.

``PruneEvalCallback`` evaluates the model at several sparsity levels at the end of training epochs and logs the
pruning curve, its area, and the compressibility metrics of Wan et al. (2024). All pruning and all metrics come from the
functional core (``lightning_heavytail.pruning.evaluate_pruning``, every method in one pass, and
``lightning_heavytail.compressibility.compressibility_report``); the callback's hooks only decide *when* to evaluate;
the evaluation data and its DDP shards come from ``_eval_data``, the records, files and figures from
``_prune_history``.

References:
    Y. Wan, M. Barsbey, A. Zaidi, U. Şimşekli, "Implicit Compressibility of Overparametrized Neural Networks Trained
    with Heavy-Tailed SGD", ICML 2024 (arXiv 2306.08125).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from lightning_heavytail._checks import (
    check_bool,
    check_dataloader,
    check_int,
    check_metric_name,
    check_metrics,
    check_name,
    validate_epsilon,
    validate_forward,
    validate_sparsities,
)
from lightning_heavytail._compat import batches_that_stepped
from lightning_heavytail._extras import require
from lightning_heavytail.callbacks._eval_data import (
    ShardedBatches,
    find_lightning_source,
    lightning_loaders,
    rank_zero_buffers,
    sharded_batches,
)
from lightning_heavytail.callbacks._eval_progress import CountedBatches, evaluation_progress
from lightning_heavytail.callbacks._prune_history import (
    EpsilonRecord,
    EvaluationRecord,
    tensorboards,
    to_tensorboard,
    write_history,
)
from lightning_heavytail.callbacks._prune_support import check_distinct, check_strategy_supported, known_metric_names
from lightning_heavytail.compressibility import DEFAULT_REPORT_SPARSITIES, compressibility_report
from lightning_heavytail.pruning import (
    DEFAULT_METRIC_KEY,
    ForwardFn,
    OutputKey,
    PruningCurve,
    check_prunable,
    evaluate_pruning,
    level_label,
    rng_preserved,
    tensor_view,
)
from lightning_heavytail.pruning.methods import require_methods, validate_method
from lightning_heavytail.selection import ParamSelector, validate_exclude, validate_selector

__all__ = ["PruneEvalCallback"]

_STATE_VERSION = 1
_DEFAULT_PREFIX = "pruning"


class PruneEvalCallback(Callback):
    r"""Evaluate pruning curves and compressibility metrics at the end of training epochs.

    At the end of every ``every_n_epochs``-th training epoch, the model is evaluated on ``dataloader`` at each level of
    ``sparsities`` with each pruning ``method`` (see ``evaluate_pruning_curve``), and the compressibility metrics of
    its weights are computed (see ``compressibility_report``). One pass over the data serves every level of every
    method and the epsilon point (``evaluate_pruning``): each batch is loaded once. The model is never changed:
    every parameter and buffer is bitwise restored, train/eval modes and ``requires_grad`` too, also when the
    evaluation raises; the optimizer state is not touched, so a checkpoint saved in the same epoch holds the unpruned
    weights.

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
    gets the same curve, equal to the single-process curve of the saved model. Under ``ModelParallelStrategy`` with
    FSDP2 (``fully_shard``, ``tensor_parallel_size=1``) the same holds for the mask methods: each rank prunes its
    shards with global thresholds found without gathering (see ``docs/multi_gpu.md``).

    Logged with ``pl_module.log`` (so ``ModelCheckpoint`` and ``EarlyStopping`` can ``monitor`` them), with
    ``log_prefix="pruning"``:

    - ``pruning/{method}/{metric}@{level}`` for every method, per requested level, written with two decimals or as many
      as the level has (``0.90``, ``0.995``: see ``level_names`` and ``lightning_heavytail.pruning.level_label``);
    - ``pruning/{method}/measured_sparsity@{level}``: the measured fraction pruned at that level;
    - ``pruning/auc`` (first method, ``auc_metric``; also on the progress bar) and ``pruning/{method}/auc``: the area
      under the metric-vs-measured sparsity curve, normalised by the sparsity span (the curve's mean value);
    - the paper's measurement (``epsilon_point=True``), through ``evaluate_at_epsilon`` on the tensors the curves
      prune: ``pruning/at_epsilon/{metric}``, the metric of the model with each layer pruned at its epsilon point (the
      most units of smallest squared norm within ``epsilon`` of its squared Frobenius norm, no fine-tuning);
      ``pruning/at_epsilon/ratio``, the units pruned over all units; ``pruning/at_epsilon/ratio/{name}`` per layer;
    - ``pruning/{key}`` for every key of the compressibility report (``compressibility=True``).

    Each value is logged under one name: with a single pruned layer, its per-layer compressibility and epsilon-ratio
    keys equal their aggregates (``/total``, ``/mean``, ``at_epsilon/ratio``), and only those are logged. TensorBoard
    also gets a custom-scalars layout (its "Custom Scalars" tab): each method's metric at every level in one chart,
    the compressibility metrics in others.

    With a ``TensorBoardLogger``, a figure of every method's curves (one line per evaluated epoch, the epsilon point a
    star) goes to the images tab under ``pruning/{method}/curve``. The history is written after every evaluation as
    ``{history_stem}.json`` and ``.csv`` into ``trainer.log_dir`` (``default_root_dir`` without a logger):
    ``prune_eval.json`` with the default prefix, ``prune_eval_{log_prefix}.json`` with another. Two
    PruneEvalCallbacks with the same ``log_prefix`` (or the same history files) are refused at setup.

    Args:
        sparsities: strictly increasing levels in ``[0, 1)``.
        method: one of ``lightning_heavytail.pruning.PRUNING_METHODS`` (see ``lightning_heavytail.pruning.methods``),
            or a sequence of them (one curve each; the first one feeds ``pruning/auc``).
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
        epsilon_point: evaluate and log the model pruned at the epsilon point (in the same pass over the data as the
            curves).
        log_figure: send the curve figure to every ``TensorBoardLogger``.
        filename: base name of the JSON and CSV files written into the run directory (followed by the prefix when it
            is not the default, see ``history_stem``); ``None`` writes no files.
        auc_metric: metric whose area is logged as ``pruning/auc`` and ``pruning/{method}/auc``; ``None``:
            ``"accuracy"`` for the default metric, else the first key of the curve's metrics.

    Raises:
        TypeError: at construction, for an argument of the wrong type.
        ValueError: at construction, for a bad argument value (the message names it, the allowed values and the value
            given); at setup, if there is no evaluation data or another PruneEvalCallback has the same ``log_prefix``,
            or the strategy shards parameters in a way the evaluation cannot follow (FSDP1, DeepSpeed, tensor
            parallelism, or ``"structured"``/``"svd"`` under ``ModelParallelStrategy``: the message names what works);
            at fit start, before the first training step, if the model's output cannot be scored, ``auc_metric`` is not
            a computed metric, nothing is selected for pruning, or ``method="structured"`` and torch-pruning cannot
            trace the model (the message names the layer and suggests another method), or under DDP the data has
            fewer batches than ranks; at an evaluation, if pruning makes the predictions NaN.
        ModuleNotFoundError: at construction for ``method="structured"`` without torch-pruning, at setup for
            ``log_figure=True`` with a TensorBoardLogger and without matplotlib (the message names the extra).

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
        >>> sorted(name for name in trainer.callback_metrics if name.startswith("pruning/global/accuracy@"))
        ['pruning/global/accuracy@0.00', 'pruning/global/accuracy@0.50', 'pruning/global/accuracy@0.90']
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
        require_methods(self.methods)
        check_dataloader(dataloader, reiterable=True, allow_none=True)
        check_metrics(metrics)
        check_int(every_n_epochs, "every_n_epochs", minimum=1)
        if params is not None:
            validate_selector(params, "params")
        self.exclude = validate_exclude(exclude)
        validate_forward(forward_fn, output_key)
        self.epsilon = validate_epsilon(epsilon)
        if report_sparsities is None:
            report_levels = tuple(level for level in self.sparsities if level > 0.0) or DEFAULT_REPORT_SPARSITIES
        else:
            report_levels = validate_sparsities(report_sparsities, "report_sparsities")
        check_name(log_prefix, "log_prefix", prefix=True)
        for name, flag in (("compressibility", compressibility), ("epsilon_point", epsilon_point),
                           ("log_figure", log_figure)):
            check_bool(flag, name)
        check_name(filename, "filename", allow_none=True, file_name=True)
        check_name(auc_metric, "auc_metric", allow_none=True)
        known = known_metric_names(metrics)
        if auc_metric is not None and known is not None:
            check_metric_name(auc_metric, known, "auc_metric")

        self.dataloader, self.metrics, self.every_n_epochs = dataloader, metrics, every_n_epochs
        self.params, self.forward_fn, self.output_key = params, forward_fn, output_key  # what and how to evaluate
        self.report_sparsities: tuple[float, ...] = report_levels
        self.compressibility, self.epsilon_point, self.log_figure = compressibility, epsilon_point, log_figure
        self.log_prefix, self.filename, self.auc_metric = log_prefix, filename, auc_metric  # where results go
        self.level_names: tuple[str, ...] = tuple(level_label(level) for level in self.sparsities)
        self.records: list[EvaluationRecord] = []
        self._layouts_written: set[int] = set()  # TensorBoardLoggers (by id) given the custom-scalars layout

        self._source: str | None = None  # where the evaluation data comes from, resolved at setup
        self._lightning_source: Any = None  # Lightning's _DataLoaderSource when the data comes from Lightning
        self._batches: ShardedBatches | None = None  # this rank's share of it, built at fit start

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            methods=self.methods, sparsities=self.sparsities, every_n_epochs=self.every_n_epochs, prefix=self.log_prefix
        )

    @property
    def history(self) -> list[dict[str, Any]]:
        """The evaluations so far in their JSON form (``EvaluationRecord.to_dict``, as in the history file): a copy.

        ``records`` holds them typed. Setting ``history`` to such dicts replaces the records (missing fields get
        defaults).
        """
        return [record.to_dict() for record in self.records]

    @history.setter
    def history(self, entries: Sequence[dict[str, Any]]) -> None:
        self.records = [EvaluationRecord.from_dict(entry) for entry in entries]

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
            self._setup(trainer)

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
        return {"version": _STATE_VERSION, "history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict.get("history", [])

    # ------------------------------------------------------------------ private

    def _setup(self, trainer: Trainer) -> None:
        """Check the strategy, the other PruneEvalCallbacks and the figures; find the evaluation data (not load it)."""
        check_strategy_supported(trainer.strategy, self.methods)
        check_distinct(self, trainer.callbacks)  # type: ignore[attr-defined]
        if self.log_figure and tensorboards(trainer.loggers):
            require("figures", "PruneEvalCallback(log_figure=True) with a TensorBoardLogger (or log_figure=False)")
        self._lightning_source = None
        if self.dataloader is not None:
            self._source = "the `dataloader` argument"
        else:
            self._source, self._lightning_source = find_lightning_source(trainer)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> ShardedBatches:
        """Load this rank's share of the evaluation data and check that the model can be pruned as asked."""
        if self._source is None:
            self._setup(trainer)
        if self.dataloader is not None:
            loaders: list[Iterable[Any]] = [self.dataloader]
        else:
            loaders = lightning_loaders(self._lightning_source, self._source)
        batches = sharded_batches(loaders, trainer, self._source, pl_module.device)
        check = check_prunable(
            pl_module,
            self.methods,
            batches.first_batch(pl_module.device),
            params=self.params,
            exclude=self.exclude,
            forward_fn=self.forward_fn,
            output_key=self.output_key,
            metrics=self.metrics,
        )
        if self.auc_metric is not None:
            check_metric_name(self.auc_metric, check.metrics, "auc_metric")
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
        common: dict[str, Any] = {"metrics": self.metrics, "forward_fn": self.forward_fn,
                                  "output_key": self.output_key, "device": pl_module.device}
        with trainer.precision_plugin.forward_context(), rank_zero_buffers(pl_module, trainer.world_size), \
                evaluation_progress(trainer, self._progress_description(), batches.rank_zero_batches) as tick:
            # every method's levels and the epsilon point in one pass over the data
            evaluation = evaluate_pruning(pl_module, CountedBatches(batches, tick), self.sparsities,
                                          methods=self.methods, epsilon=self.epsilon if self.epsilon_point else None,
                                          params=self.params, exclude=self.exclude, **common)
        curves, point = evaluation.curves, evaluation.at_epsilon
        pruned = set(curves[self.methods[0]].params)  # the report: the curves' tensors
        report: dict[str, float] = {}
        if self.compressibility:
            report = compressibility_report(tensor_view(pl_module), params=lambda name, _: name in pruned,
                                            sparsities=self.report_sparsities, epsilon=self.epsilon)
        auc_metric = self._auc_metric(curves[self.methods[0]])
        record = EvaluationRecord(
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            curves=curves,
            compressibility={key: float(value) for key, value in report.items()},
            auc={method: float(curve.area_under_curve(auc_metric)) for method, curve in curves.items()},
            auc_metric=auc_metric,
            at_epsilon=EpsilonRecord.of(point, pl_module) if point is not None else None,
        )
        self.records = [old for old in self.records if old.epoch != record.epoch] + [record]

        headline = f"{self.log_prefix}/auc"
        for name, value in record.scalars(self.log_prefix, self.methods, self.level_names).items():
            # identical on every rank (synced metrics, replicated weights): "max" syncs them exactly
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max",
                          prog_bar=name == headline)
        if self.filename is not None:
            log_dir = trainer.log_dir  # a broadcast under DDP: every rank must call it
            if trainer.is_global_zero and self.history_stem is not None:
                write_history(self.records, self.methods, log_dir or trainer.default_root_dir, self.history_stem)
        if trainer.is_global_zero:
            # the step Lightning gives the epoch-end scalars logged above, so image and scalars line up in TensorBoard
            step = batches_that_stepped(trainer) - 1
            to_tensorboard(trainer.loggers, self.records, self.log_prefix, self.methods, step, figures=self.log_figure,
                           layouts_written=self._layouts_written)

    def _progress_description(self) -> str:
        """What the progress bar says while the evaluation runs: what is evaluated on each batch."""
        point = " + epsilon point" if self.epsilon_point else ""
        return f"{self.log_prefix}: {'/'.join(self.methods)} x {len(self.sparsities)} levels{point}"

    def _auc_metric(self, curve: PruningCurve) -> str:
        """The metric whose area is logged: ``auc_metric``, else accuracy (default metric), else the first one."""
        name = self.auc_metric
        if name is None:
            name = DEFAULT_METRIC_KEY if DEFAULT_METRIC_KEY in curve.metrics else next(iter(curve.metrics))
        check_metric_name(name, curve.metrics, "auc_metric")
        return name

