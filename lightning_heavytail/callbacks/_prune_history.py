"""PruneEvalCallback's record of each evaluation, its history files (JSON, CSV), its logged names and its figures.

An ``EvaluationRecord`` is one evaluation, typed; ``to_dict``/``from_dict`` give the JSON form that the history file
and the checkpoint state hold (unchanged from the first version: entries of older checkpoints load with defaults).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_heavytail._extras import import_optional
from lightning_heavytail._plotting import label_sparsity_axis, sparsity_axis
from lightning_heavytail.pruning import DEFAULT_METRIC_KEY, REGISTRY, EpsilonPoint, PruningCurve, tensor_view


@dataclass
class EpsilonRecord:
    """The epsilon point of one evaluation and where it lies on the curves' x-axes.

    Attributes:
        point: the point (``evaluate_at_epsilon``).
        sparsity: the fraction of the pruned tensors' entries it zeroes (the mask methods' x-axis).
        removed: the fraction of all the model's parameters it zeroes (the ``"structured"`` x-axis).
    """

    point: EpsilonPoint
    sparsity: float
    removed: float

    @classmethod
    def of(cls, point: EpsilonPoint, model: nn.Module) -> EpsilonRecord:
        """Place ``point`` of ``model``: a unit holds ``numel / units`` entries, so ratio ``r`` zeroes ``r * numel``."""
        sizes = {name: tensor.numel() for name, tensor in tensor_view(model).named_parameters()}
        zeroed = sum(ratio * sizes[name] for name, ratio in point.ratios.items())
        return cls(point, zeroed / sum(sizes[name] for name in point.ratios),
                   zeroed / sum(p.numel() for p in model.parameters()))

    def to_dict(self) -> dict[str, Any]:
        """``EpsilonPoint.to_dict()`` with ``sparsity`` and ``removed``."""
        return {**self.point.to_dict(), "sparsity": float(self.sparsity), "removed": float(self.removed)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpsilonRecord:
        """Read ``to_dict``'s output back."""
        return cls(EpsilonPoint.from_dict(dict(data)), float(data["sparsity"]), float(data["removed"]))


@dataclass
class EvaluationRecord:
    """One evaluation of PruneEvalCallback (the defaults are what an entry of an older checkpoint lacks).

    Attributes:
        epoch: the training epoch it followed.
        global_step: the trainer's global step then.
        curves: method -> its curve.
        compressibility: the compressibility report.
        auc: method -> area under its curve of ``auc_metric``.
        auc_metric: the metric whose area ``auc`` holds.
        at_epsilon: the epsilon point, None when it was not evaluated.
    """

    epoch: int = -1
    global_step: int = -1
    curves: dict[str, PruningCurve] = field(default_factory=dict)
    compressibility: dict[str, float] = field(default_factory=dict)
    auc: dict[str, float] = field(default_factory=dict)
    auc_metric: str = DEFAULT_METRIC_KEY
    at_epsilon: EpsilonRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the history file's and the checkpoint's entry); the epsilon point ``{}`` when absent."""
        return {
            "epoch": int(self.epoch),
            "global_step": int(self.global_step),
            "curves": {method: curve.to_dict() for method, curve in self.curves.items()},
            "compressibility": {key: float(value) for key, value in self.compressibility.items()},
            "auc": {method: float(value) for method, value in self.auc.items()},
            "auc_metric": self.auc_metric,
            "at_epsilon": self.at_epsilon.to_dict() if self.at_epsilon is not None else {},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationRecord:
        """Read a JSON-form entry back, with defaults for the fields it lacks."""
        at_epsilon = data.get("at_epsilon") or None
        return cls(
            epoch=int(data.get("epoch", -1)),
            global_step=int(data.get("global_step", -1)),
            curves={str(m): PruningCurve.from_dict(c) for m, c in data.get("curves", {}).items()},
            compressibility={str(k): float(v) for k, v in data.get("compressibility", {}).items()},
            auc={str(m): float(v) for m, v in data.get("auc", {}).items()},
            auc_metric=str(data.get("auc_metric", DEFAULT_METRIC_KEY)),
            at_epsilon=EpsilonRecord.from_dict(at_epsilon) if at_epsilon is not None else None,
        )

    def scalars(self, prefix: str, methods: Sequence[str], level_names: Sequence[str]) -> dict[str, float]:
        """Every logged name and value (see PruneEvalCallback), each value under one name.

        With a single pruned layer, its per-layer compressibility and epsilon-ratio keys equal their aggregates
        (``/total``, ``/mean``, the overall ratio) and only the aggregates are logged.
        """
        out: dict[str, float] = {}

        def put(name: str, value: float) -> None:
            if name in out:
                raise ValueError(f"PruneEvalCallback would log {name!r} twice; rename a metric or change `log_prefix`")
            out[name] = float(value)

        for method in methods:
            curve = self.curves[method]
            for j, level in enumerate(level_names):
                for metric, values in curve.metrics.items():
                    put(f"{prefix}/{method}/{metric}@{level}", values[j])
                put(f"{prefix}/{method}/measured_sparsity@{level}", curve.sparsities[j])
            put(f"{prefix}/{method}/auc", self.auc[method])
        put(f"{prefix}/auc", self.auc[methods[0]])
        layers = self.layers()
        if self.at_epsilon is not None:
            point = self.at_epsilon.point
            for metric, value in point.metrics.items():
                put(f"{prefix}/at_epsilon/{metric}", value)
            put(f"{prefix}/at_epsilon/ratio", point.ratio)
            if len(point.ratios) > 1:
                for name, ratio in point.ratios.items():
                    put(f"{prefix}/at_epsilon/ratio/{name}", ratio)
        for key, value in self.compressibility.items():
            if len(layers) == 1 and key.rpartition("/")[2] in layers:
                continue  # the one layer's value is its aggregate's
            put(f"{prefix}/{key}", value)
        return out

    def layers(self) -> set[str]:
        """The names of the tensors the compressibility report covers (its per-layer keys end in them)."""
        return {key.split("/", 1)[1] for key in self.compressibility
                if key.startswith("fraction_prunable/") and key != "fraction_prunable/total"}


def scalars_layout(prefix: str, methods: Sequence[str], metric_names: Sequence[str]) -> dict[str, Any]:
    """TensorBoard's custom-scalars layout, for ``SummaryWriter.add_custom_scalars``.

    Each method's metric at every level is one multi-line chart, and the compressibility metrics get charts of their
    own, so TensorBoard's "Custom Scalars" tab shows the curves' evolution without the user arranging anything.

    Examples:
        >>> layout = scalars_layout("pruning", ["neuron"], ["accuracy"])
        >>> layout["pruning: pruning curves"]["neuron: accuracy at every level"]
        ['Multiline', ['^pruning/neuron/accuracy@']]
    """
    tag = re.escape(prefix)
    curves = {
        f"{method}: {metric} at every level": ["Multiline", [f"^{tag}/{re.escape(method)}/{re.escape(metric)}@"]]
        for method in methods for metric in metric_names
    }
    curves["area under each curve"] = ["Multiline", [f"^{tag}/(.*/)?auc$"]]
    compressibility = {
        "fraction prunable (epsilon point)": ["Multiline", [f"^{tag}/fraction_prunable/", f"^{tag}/at_epsilon/ratio"]],
        "metrics at the epsilon point": ["Multiline", [f"^{tag}/at_epsilon/(?!ratio)"]],
        "best-k relative error": ["Multiline", [f"^{tag}/best_k_error@"]],
        "tail index": ["Multiline", [f"^{tag}/alpha_"]],
    }
    return {f"{prefix}: pruning curves": curves, f"{prefix}: compressibility": compressibility}


def write_history(records: Sequence[EvaluationRecord], methods: Sequence[str], directory: str, stem: str) -> None:
    """Write ``{stem}.json`` (everything) and ``{stem}.csv``.

    The CSV has one row per epoch, method and level, and one per epoch for the epsilon point (method ``at_epsilon``,
    ``requested`` the epsilon, ``sparsity`` the fraction of the pruned entries it zeroes, ``epsilon_ratio`` the
    fraction of units).
    """
    fs = get_filesystem(directory)
    fs.makedirs(directory, exist_ok=True)
    with fs.open(os.path.join(directory, f"{stem}.json"), "w") as f:
        json.dump({"methods": list(methods), "history": [record.to_dict() for record in records]}, f, indent=1)

    metric_names: list[str] = []
    for record in records:
        sources = [curve.metrics for curve in record.curves.values()]
        for metrics in sources + ([record.at_epsilon.point.metrics] if record.at_epsilon is not None else []):
            metric_names += [name for name in metrics if name not in metric_names]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["epoch", "global_step", "method", "requested", "sparsity", *metric_names, "epsilon_ratio"])
    for record in records:
        for method, curve in record.curves.items():
            for j, (requested, measured) in enumerate(zip(curve.requested, curve.sparsities, strict=True)):
                values = [curve.metrics[name][j] if name in curve.metrics else "" for name in metric_names]
                writer.writerow([record.epoch, record.global_step, method, requested, measured, *values, ""])
        if record.at_epsilon is not None:
            point = record.at_epsilon.point
            values = [point.metrics.get(name, "") for name in metric_names]
            writer.writerow([record.epoch, record.global_step, "at_epsilon", point.epsilon, record.at_epsilon.sparsity,
                             *values, point.ratio])
    with fs.open(os.path.join(directory, f"{stem}.csv"), "w") as f:
        f.write(buffer.getvalue())


def curves_figure(history: Sequence[EvaluationRecord | Mapping[str, Any]], method: str, title: str) -> Any:
    """A matplotlib Figure of ``method``'s curves, one line per evaluated epoch, its epsilon point as a star.

    ``history`` holds records, or their JSON form (as in the history file). The star sits at the epsilon point's
    accuracy (or other metric) and at its place on this method's x-axis: the fraction of the pruned entries it zeroes,
    or for a method that prunes copies (``"structured"``) the fraction of all parameters.

    Raises:
        ModuleNotFoundError: without matplotlib (the message names the extra to install).
    """
    needed_for = "PruneEvalCallback's figures (log_figure=True)"
    cm = import_optional("matplotlib.cm", "figures", needed_for)
    colors = import_optional("matplotlib.colors", "figures", needed_for)
    figure_module = import_optional("matplotlib.figure", "figures", needed_for)
    records = [r if isinstance(r, EvaluationRecord) else EvaluationRecord.from_dict(r) for r in history]
    entries = [record for record in records if method in record.curves]
    metric_names = list(entries[-1].curves[method].metrics) if entries else []
    figure = figure_module.Figure(figsize=(4.5 * max(1, len(metric_names)), 3.6), dpi=80, layout="constrained")
    axes = figure.subplots(1, max(1, len(metric_names)), squeeze=False)[0]
    epochs = [record.epoch for record in entries]
    norm = colors.Normalize(vmin=min(epochs, default=0), vmax=max(max(epochs, default=0), min(epochs, default=0) + 1))
    mappable = cm.ScalarMappable(norm=norm, cmap="viridis")
    in_place = getattr(REGISTRY.get(method), "in_place", True)  # else its x-axis is the share of parameters removed
    for ax, name in zip(axes, metric_names, strict=False):
        starred = False
        for record in entries:
            curve, placed, color = record.curves[method], record.at_epsilon, mappable.to_rgba(record.epoch)
            if name in curve.metrics:
                xs = [sparsity_axis(s) for s in curve.sparsities]
                ax.plot(xs, curve.metrics[name], marker="o", markersize=3, color=color, alpha=0.85,
                        label=f"epoch {record.epoch}")
            if placed is not None and name in placed.point.metrics:
                x = placed.sparsity if in_place else placed.removed
                ax.plot([sparsity_axis(x)], [placed.point.metrics[name]], marker="*", markersize=12, linestyle="none",
                        color=color, markeredgecolor="black",
                        label=None if starred else f"epsilon point (epsilon={placed.point.epsilon:g})")
                starred = True
        label_sparsity_axis(ax, [s for record in entries for s in record.curves[method].sparsities])
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if len(entries) <= 6:
        axes[0].legend(fontsize="small")
    else:
        figure.colorbar(mappable, ax=list(axes), label="epoch")
    figure.suptitle(title)
    return figure


def render_curves(history: Sequence[EvaluationRecord | Mapping[str, Any]], method: str, title: str) -> Any:
    """``curves_figure`` as an RGB image (H, W, 3 uint8 array), drawn with Agg (no display, no pyplot state)."""
    agg = import_optional("matplotlib.backends.backend_agg", "figures", "PruneEvalCallback's figures")
    canvas = agg.FigureCanvasAgg(curves_figure(history, method, title))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def tensorboards(loggers: Sequence[Any]) -> list[TensorBoardLogger]:
    """The TensorBoardLoggers among ``loggers``."""
    return [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]


def to_tensorboard(loggers: Sequence[Any], records: Sequence[EvaluationRecord], prefix: str, methods: Sequence[str],
                   step: int, *, figures: bool, layouts_written: set[int]) -> None:
    """Write what TensorBoard shows beyond the scalars (rank zero only).

    Every TensorBoardLogger gets the custom-scalars layout once (``layouts_written`` holds the ids of those that have
    it) and, with ``figures``, one figure per method (all evaluated epochs' curves) at ``step``.
    """
    boards = tensorboards(loggers)
    if not boards or not records:
        return
    metric_names = list(next(iter(records[-1].curves.values())).metrics)
    for logger in boards:
        if id(logger) not in layouts_written:
            logger.experiment.add_custom_scalars(scalars_layout(prefix, methods, metric_names))
            layouts_written.add(id(logger))
    for method in methods if figures else ():
        image = render_curves(records, method, title=f"{prefix}: {method} pruning")
        for logger in boards:
            logger.experiment.add_image(f"{prefix}/{method}/curve", image, global_step=step, dataformats="HWC")
