"""PruneEvalCallback's typed records: the JSON form of the history, old entries' defaults, files, scalars, figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from lightning_utilities.core.imports import RequirementCache

from lightning_heavytail._extras import REQUIREMENTS
from lightning_heavytail._plotting import sparsity_axis
from lightning_heavytail.callbacks._prune_history import (
    EpsilonRecord,
    EvaluationRecord,
    curves_figure,
    render_curves,
    scalars_layout,
    write_history,
)
from lightning_heavytail.pruning import EpsilonPoint, PruningCurve


def record(epoch: int = 1, with_point: bool = True) -> EvaluationRecord:
    curve = PruningCurve("global", [0.0, 0.5], [0.0, 0.52], {"accuracy": [0.9, 0.8]}, ["fc.weight"])
    point = EpsilonPoint(0.1, {"fc.weight": 0.25}, 0.25, {"accuracy": 0.85})
    return EvaluationRecord(epoch=epoch, global_step=10 * epoch, curves={"global": curve},
                            compressibility={"fraction_prunable/total": 0.25}, auc={"global": 0.85},
                            auc_metric="accuracy",
                            at_epsilon=EpsilonRecord(point, sparsity=0.25, removed=0.2) if with_point else None)


def test_the_json_form_round_trips_and_keeps_the_file_format() -> None:
    entry = record().to_dict()
    assert list(entry) == ["epoch", "global_step", "curves", "compressibility", "auc", "auc_metric", "at_epsilon"]
    assert entry["curves"]["global"] == record().curves["global"].to_dict()
    assert entry["at_epsilon"] == {"epsilon": 0.1, "ratios": {"fc.weight": 0.25}, "ratio": 0.25,
                                   "metrics": {"accuracy": 0.85}, "sparsity": 0.25, "removed": 0.2}
    assert EvaluationRecord.from_dict(json.loads(json.dumps(entry))) == record()
    assert record(with_point=False).to_dict()["at_epsilon"] == {}
    assert EvaluationRecord.from_dict({"at_epsilon": {}}).at_epsilon is None


def test_entries_of_older_checkpoints_get_defaults() -> None:
    old = {"epoch": 3, "curves": {"neuron": {"method": "neuron", "requested": [0.5], "sparsities": [0.5],
                                             "metrics": {"accuracy": [0.7]}}}}  # no params, no auc, no epsilon point
    loaded = EvaluationRecord.from_dict(old)
    assert (loaded.epoch, loaded.global_step, loaded.auc, loaded.auc_metric, loaded.at_epsilon) == (
        3, -1, {}, "accuracy", None)
    assert loaded.curves["neuron"].params == []


def test_scalars_name_every_value_once() -> None:
    scalars = record().scalars("pruning", ("global",), ("0.00", "0.50"))
    assert scalars["pruning/global/accuracy@0.50"] == 0.8
    assert "pruning/accuracy@0.50" not in scalars  # no short-name copy of the first method's values
    assert scalars["pruning/global/measured_sparsity@0.50"] == 0.52
    assert scalars["pruning/auc"] == scalars["pruning/global/auc"] == 0.85  # the headline, for monitors
    assert scalars["pruning/at_epsilon/ratio"] == 0.25
    assert "pruning/at_epsilon/ratio/fc.weight" not in scalars  # one layer: its ratio is the overall ratio
    assert scalars["pruning/fraction_prunable/total"] == 0.25
    clash = record()
    clash.compressibility["auc"] = 1.0  # would be logged as pruning/auc a second time
    with pytest.raises(ValueError, match="would log 'pruning/auc' twice"):
        clash.scalars("pruning", ("global",), ("0.00", "0.50"))


def test_history_files_hold_every_record(tmp_path: Path) -> None:
    records = [record(0), record(1, with_point=False)]
    write_history(records, ["global"], str(tmp_path), "stem")
    written = json.loads((tmp_path / "stem.json").read_text())
    assert written == {"methods": ["global"], "history": [r.to_dict() for r in records]}
    with open(tmp_path / "stem.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["epoch"], row["method"]) for row in rows] == [("0", "global")] * 2 + [("0", "at_epsilon")] + [
        ("1", "global")] * 2
    assert float(rows[2]["epsilon_ratio"]) == 0.25 and float(rows[2]["sparsity"]) == 0.25


def test_figures_without_matplotlib_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REQUIREMENTS, "figures", RequirementCache("matplotlib-not-installed-here"))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-heavytail\[figures\]'"):
        curves_figure([record()], "global", "t")


@pytest.mark.parametrize("method", ["neuron", "structured"])
def test_the_figure_marks_the_epsilon_point_on_each_curve(method: str) -> None:
    def entry(epoch: int, star: bool) -> dict[str, Any]:
        curve = {"method": method, "requested": [0.0, 0.5], "sparsities": [0.0, 0.45],
                 "metrics": {"accuracy": [0.9, 0.7]}, "params": ["fc1.weight"]}
        point = {"epsilon": 0.1, "ratios": {"fc1.weight": 0.3}, "ratio": 0.3,
                 "metrics": {"accuracy": 0.85 + epoch / 100}, "sparsity": 0.3, "removed": 0.2}
        return {"epoch": epoch, "curves": {method: curve}, "at_epsilon": point if star else {}}

    history = [entry(0, True), entry(1, True)]
    figure = curves_figure(history, method, "t")
    stars = [line for line in figure.axes[0].lines if line.get_marker() == "*"]
    # on this method's x-axis, which spreads the high sparsities: -log10(1 - s)
    x = sparsity_axis(0.2 if method == "structured" else 0.3)
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in stars] == [([x], [0.85]), ([x], [0.86])]
    assert [line.get_color() for line in stars] == [line.get_color() for line in figure.axes[0].lines
                                                    if line.get_marker() == "o"]  # each in its epoch's colour
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels.count("epsilon point (epsilon=0.1)") == 1
    without = [entry(0, False), entry(1, False)]
    assert not any(line.get_marker() == "*" for line in curves_figure(without, method, "t").axes[0].lines)
    assert render_curves(history, method, "t").shape[2] == 3


def test_one_layer_logs_only_the_aggregates_and_several_layers_log_each() -> None:
    one = record()
    one.compressibility = {"fraction_prunable/fc.weight": 0.25, "fraction_prunable/total": 0.25,
                           "alpha_hill/fc.weight": 1.7, "alpha_hill/mean": 1.7}
    scalars = one.scalars("pruning", ("global",), ("0.00", "0.50"))
    assert {"pruning/fraction_prunable/total", "pruning/alpha_hill/mean"} <= set(scalars)
    assert not any(name.endswith("/fc.weight") for name in scalars)
    two = record()
    two.compressibility = {"fraction_prunable/a": 0.2, "fraction_prunable/b": 0.3, "fraction_prunable/total": 0.25}
    two.at_epsilon = EpsilonRecord(EpsilonPoint(0.1, {"a": 0.2, "b": 0.3}, 0.25, {"accuracy": 0.8}), 0.25, 0.2)
    scalars = two.scalars("pruning", ("global",), ("0.00", "0.50"))
    assert scalars["pruning/fraction_prunable/a"] == 0.2 and scalars["pruning/at_epsilon/ratio/b"] == 0.3


def test_the_custom_scalars_layout_charts_every_level_of_each_method_and_the_compressibility() -> None:
    import re

    layout = scalars_layout("eval/x", ["global", "neuron"], ["accuracy", "f1"])
    curves, compressibility = layout["eval/x: pruning curves"], layout["eval/x: compressibility"]
    assert set(curves) == {"global: accuracy at every level", "global: f1 at every level",
                           "neuron: accuracy at every level", "neuron: f1 at every level", "area under each curve"}
    (pattern,) = curves["neuron: accuracy at every level"][1]
    tags = ["eval/x/neuron/accuracy@0.50", "eval/x/neuron/accuracy@0.995", "eval/x/global/accuracy@0.50",
            "eval/x/neuron/measured_sparsity@0.50", "evalXx/neuron/accuracy@0.50"]
    assert [bool(re.search(pattern, tag)) for tag in tags] == [True, True, False, False, False]
    metrics_at_epsilon = compressibility["metrics at the epsilon point"][1][0]
    assert re.search(metrics_at_epsilon, "eval/x/at_epsilon/accuracy")
    assert not re.search(metrics_at_epsilon, "eval/x/at_epsilon/ratio")
