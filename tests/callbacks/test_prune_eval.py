"""PruneEvalCallback: real Trainers, real loggers and event files, real 2-process DDP on the CPU."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_heavytail.callbacks.prune_eval import PruneEvalCallback
from lightning_heavytail.pruning import evaluate_at_epsilon, evaluate_pruning_curve
from tests.test_pruning_epsilon import rows_to_prune

LEVELS = (0.0, 0.5, 0.8, 0.95)

# ------------------------------------------------------------------ helpers (module level: picklable for spawn)


class TinyNet(LightningModule):
    """MLP with a BatchNorm (buffers, train/eval behaviour), dropout, and a frozen parameter."""

    def __init__(self, width: int = 32, classes: int = 3, momentum: float = 0.9, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, classes)
        )
        self.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)
        self.momentum = momentum
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class TinyNetWithValidation(TinyNet):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


class PlainMLP(LightningModule):
    """Bias-free two-layer MLP: the tiny model for the independent computation."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 24, bias=False)
        self.out = nn.Linear(24, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # learnable, 3 classes
    return TensorDataset(x, y)


def loader(n: int, seed: int, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset(n, seed), batch_size=batch_size)


class SampleCount(Metric):
    """Number of samples seen (summed over ranks): shows which data was evaluated, and that none was duplicated."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.n += target.shape[0]

    def compute(self) -> Tensor:
        return self.n


def counting_metrics() -> MetricCollection:
    return MetricCollection({"accuracy": MulticlassAccuracy(num_classes=3, average="micro"), "count": SampleCount()})


class Snapshot(Callback):
    """Records the full model and optimizer state at on_train_epoch_end (place it before/after the callback)."""

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.states.append(capture(trainer, pl_module))


def capture(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    opt = trainer.optimizers[0]
    params = [p for group in opt.param_groups for p in group["params"]]  # checkpoint numbering
    return {
        "tensors": {k: v.detach().clone() for k, v in pl_module.state_dict(keep_vars=True).items()},
        "training": {name: m.training for name, m in pl_module.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in pl_module.named_parameters()},
        "opt_state": {
            i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state
        },
        "opt_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["tensors"].keys() == b["tensors"].keys()
    for key in a["tensors"]:
        assert torch.equal(a["tensors"][key], b["tensors"][key]), key  # bitwise (no NaN in these models)
    assert a["training"] == b["training"]
    assert a["requires_grad"] == b["requires_grad"]
    assert a["opt_state"].keys() == b["opt_state"].keys()
    for i in a["opt_state"]:
        for k in a["opt_state"][i]:
            assert torch.equal(a["opt_state"][i][k], b["opt_state"][i][k]), (i, k)
    assert a["opt_groups"] == b["opt_groups"]
    assert a["grad_enabled"] == b["grad_enabled"]


def trainer_kwargs(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "accelerator": "cpu",
        "devices": 1,
    }
    kwargs.update(overrides)
    return kwargs


class DataModule(LightningDataModule):
    def __init__(self, test: bool = True, val: bool = True) -> None:
        super().__init__()
        self.has_test = test
        self.has_val = val

    def train_dataloader(self) -> DataLoader:
        return loader(32, seed=1)

    def test_dataloader(self) -> DataLoader:
        if not self.has_test:
            raise AssertionError("unreachable")
        return loader(20, seed=2, batch_size=6)

    def val_dataloader(self) -> DataLoader:
        if not self.has_val:
            raise AssertionError("unreachable")
        return loader(12, seed=3, batch_size=5)


class ValOnlyDataModule(LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return loader(32, seed=1)

    def val_dataloader(self) -> DataLoader:
        return loader(12, seed=3, batch_size=5)


class TrainOnlyDataModule(LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return loader(32, seed=1)


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsities": (0.0, 1.0)}, ValueError, "sparsities"),
        ({"sparsities": (-0.1, 0.5)}, ValueError, "sparsities"),
        ({"sparsities": (0.5, 0.2)}, ValueError, "sparsities"),
        ({"sparsities": (0.2, 0.2)}, ValueError, "sparsities"),
        ({"sparsities": ()}, ValueError, "sparsities"),
        ({"method": "random"}, ValueError, "method"),
        ({"method": ("global", "magic")}, ValueError, "method"),
        ({"every_n_epochs": 0}, ValueError, r"`every_n_epochs` must be an int >= 1, got 0"),
        ({"every_n_epochs": 1.5}, TypeError, "every_n_epochs"),
        ({"metrics": "accuracy"}, TypeError, r"`metrics` must be None, a torchmetrics Metric .* got str"),
        ({"dataloader": 3}, TypeError, "`dataloader` must be None or an iterable"),
        ({"dataloader": iter([1, 2])}, ValueError, "`dataloader` must be re-iterable"),
        ({"params": 3}, TypeError, "`params`"),
        ({"exclude": 3}, TypeError, "`exclude` must be a glob pattern or a sequence of patterns, got 3"),
        ({"forward_fn": 3}, TypeError, "`forward_fn` must be None or a callable"),
        ({"epsilon": -0.1}, ValueError, r"`epsilon` must be a number in \[0, 1\] \(a share of .*\), got -0.1"),
        ({"epsilon": 1.5}, ValueError, "`epsilon`"),
        ({"report_sparsities": (0.9, 0.5)}, ValueError, "`report_sparsities`"),
        ({"output_key": 1.5}, TypeError, r"`output_key` must be None, a key \(str\) or an index \(int\).*got float"),
        ({"output_key": ""}, ValueError, "`output_key` must not be empty"),
        ({"output_key": "logits", "forward_fn": lambda m, b: b}, ValueError, "Pass `forward_fn` or `output_key`"),
        ({"log_prefix": ""}, ValueError, "`log_prefix`"),
        ({"log_prefix": "pruning/"}, ValueError, "`log_prefix`"),
        ({"compressibility": 1}, TypeError, "`compressibility` must be True or False, got 1"),
        ({"log_figure": "yes"}, TypeError, "`log_figure`"),
        ({"filename": "a/b"}, ValueError, "`filename`"),
        ({"filename": ""}, ValueError, "`filename`"),
        ({"auc_metric": ""}, ValueError, "`auc_metric`"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        PruneEvalCallback(**kwargs)


def test_level_names_two_decimals_or_as_many_as_the_level_has() -> None:
    assert PruneEvalCallback().level_names == ("0.00", "0.50", "0.70", "0.80", "0.90", "0.95", "0.99")
    callback = PruneEvalCallback(sparsities=(0.5, 0.99, 0.995), report_sparsities=(0.5, 0.99))
    assert callback.level_names == ("0.50", "0.99", "0.995")  # a level's name does not depend on the other levels
    assert PruneEvalCallback().report_sparsities == (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    assert PruneEvalCallback(sparsities=(0.0,)).report_sparsities == (0.5, 0.9, 0.99)
    assert PruneEvalCallback(method=["neuron", "global"]).methods == ("neuron", "global")


def test_distinct_callbacks_have_distinct_state_keys() -> None:
    a, b = PruneEvalCallback(), PruneEvalCallback(method="neuron", log_prefix="p2")
    assert a.state_key != b.state_key
    assert a.state_key == PruneEvalCallback().state_key


# --------------------------------------------------------------------------- setup-time errors and data sources


def test_no_data_is_an_error_at_setup(tmp_path: Path) -> None:
    model = TinyNet()
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[PruneEvalCallback()])
    with pytest.raises(ValueError, match="PruneEvalCallback found no evaluation data: pass `dataloader=`"):
        trainer.fit(model, datamodule=TrainOnlyDataModule())
    assert trainer.global_step == 0


def test_no_prunable_parameter_is_an_error_before_training(tmp_path: Path) -> None:
    callback = PruneEvalCallback(dataloader=loader(16, 0), params="nothing.*")
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        trainer.fit(TinyNet(), loader(32, 1))
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("fit_kwargs", "source", "count"),
    [
        ({"datamodule": DataModule()}, "the datamodule's `test_dataloader()`", 20),
        ({"datamodule": DataModule(test=False)}, "the datamodule's `test_dataloader()`", None),
        ({"datamodule": ValOnlyDataModule()}, "the datamodule's `val_dataloader()`", 12),
        (
            {"train_dataloaders": loader(32, 1), "val_dataloaders": [loader(12, 3, 5), loader(8, 4, 3)]},
            "the `val_dataloaders` passed to `trainer.fit`",
            20,
        ),
    ],
)
def test_data_source_resolution(tmp_path: Path, fit_kwargs: dict[str, Any], source: str, count: int | None) -> None:
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), metrics=counting_metrics(), compressibility=False)
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    if count is None:  # the datamodule's test_dataloader is defined but fails during fit: a clear error, not a crash
        with pytest.raises(RuntimeError, match="could not get its evaluation data from the datamodule's"):
            trainer.fit(TinyNet(), **fit_kwargs)
        return
    trainer.fit(TinyNet(), **fit_kwargs)
    assert callback.data_source == source
    assert callback.history[0]["curves"]["global"]["metrics"]["count"] == [count, count]


def test_given_dataloader_wins_over_datamodule(tmp_path: Path) -> None:
    callback = PruneEvalCallback(
        sparsities=(0.0,), dataloader=loader(7, 5, 2), metrics=counting_metrics(), compressibility=False
    )
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    trainer.fit(TinyNet(), datamodule=DataModule())
    assert callback.data_source == "the `dataloader` argument"
    assert callback.history[0]["curves"]["global"]["metrics"]["count"] == [7]


# --------------------------------------------------------------------------- the model is never changed


def test_model_optimizer_and_modes_untouched(tmp_path: Path) -> None:
    before, after = Snapshot(), Snapshot()
    methods = ("global", "layerwise", "neuron", "structured")
    callback = PruneEvalCallback(sparsities=LEVELS, method=methods, dataloader=loader(24, 0))
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[before, callback, after])
    trainer.fit(TinyNet(), loader(32, 1))
    assert len(callback.history) == 2
    assert list(callback.history[0]["curves"]) == list(methods)
    assert len(before.states) == len(after.states) == 2
    for a, b in zip(before.states, after.states, strict=True):
        assert_same_state(a, b)
    # the evaluation really pruned something (else the checks above prove nothing)
    accuracy = callback.history[-1]["curves"]["global"]["metrics"]["accuracy"]
    assert len(set(accuracy)) > 1
    # and it ran with the model in train mode around it (BatchNorm + Dropout), restored afterwards
    assert before.states[0]["training"]["net.1"] is True


class DetachedHidden(LightningModule):
    """torch-pruning cannot trace through the .detach(): structured pruning must be refused at fit start."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x)).detach()
        return self.out(torch.relu(self.fc2(h)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_untraceable_model_for_structured_is_an_error_before_training(tmp_path: Path) -> None:
    callback = PruneEvalCallback(method=("global", "structured"), dataloader=loader(16, 0))
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    with pytest.raises(ValueError, match="method='neuron'") as info:
        trainer.fit(DetachedHidden(), loader(32, 1))
    assert "'fc1'" in str(info.value)
    assert trainer.global_step == 0
    # the suggested method works on the same model
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), method="neuron", dataloader=loader(16, 0))
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    trainer.fit(DetachedHidden(), loader(32, 1))
    assert callback.history[0]["curves"]["neuron"]["sparsities"][1] > 0.4


class FailingLoader:
    """Re-iterable; the second pass raises at its second batch.

    Passes: the first batch at fit start, then the evaluation's one pass (its first batch checks the output, then runs
    every level): its second batch comes after both levels were masked.
    """

    def __init__(self) -> None:
        self.data = list(loader(24, 0))
        self.passes = 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        for i, batch in enumerate(self.data):
            if self.passes == 2 and i == 1:
                raise RuntimeError("data failed mid-way")
            yield batch


def test_model_restored_when_evaluation_raises(tmp_path: Path) -> None:
    before = Snapshot()
    failing = FailingLoader()
    callback = PruneEvalCallback(sparsities=(0.5, 0.9), dataloader=failing, compressibility=False)
    model = TinyNet()
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[before, callback])
    with pytest.raises(RuntimeError, match="data failed mid-way"):
        trainer.fit(model, loader(32, 1))
    assert failing.passes == 2  # every level was evaluated on the first batch (weights masked) before the failure
    assert_same_state(before.states[0], capture(trainer, model))
    assert callback.history == []


def test_checkpoint_in_same_epoch_holds_unpruned_weights_and_monitor_works(tmp_path: Path) -> None:
    before = Snapshot()
    callback = PruneEvalCallback(sparsities=LEVELS, dataloader=loader(24, 0))
    # default save timing, with a validation loop in the epoch: Lightning saves at train epoch end, after the callback
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="pruning/auc", mode="max", save_top_k=1)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, enable_checkpointing=True, limit_val_batches=1),
        callbacks=[before, callback, checkpoint],
    )
    model = TinyNetWithValidation()
    trainer.fit(model, loader(32, 1), loader(16, 2))
    assert "val_loss" in trainer.callback_metrics  # validation did run in that epoch
    assert checkpoint.best_model_path
    ckpt = torch.load(checkpoint.best_model_path, weights_only=False)
    saved = ckpt["state_dict"]
    for key, value in before.states[0]["tensors"].items():
        assert torch.equal(saved[key], value), key
    assert checkpoint.best_model_score is not None
    auc = callback.history[0]["auc"]["global"]
    assert checkpoint.best_model_score.item() == pytest.approx(auc, rel=1e-6)
    assert ckpt["callbacks"][callback.state_key]["history"][0]["auc"]["global"] == auc
    # the optimizer state in the checkpoint is the live one, untouched
    momentum = ckpt["optimizer_states"][0]["state"]
    assert momentum and all(
        torch.equal(s["momentum_buffer"], before.states[0]["opt_state"][i]["momentum_buffer"])
        for i, s in momentum.items()
    )


def test_early_stopping_can_monitor_the_auc(tmp_path: Path) -> None:
    callback = PruneEvalCallback(sparsities=(0.0, 0.9), dataloader=loader(24, 0), compressibility=False)
    # an improvement of 1.0 in a mean accuracy is impossible: the second check must stop the run
    stopper = EarlyStopping(monitor="pruning/auc", mode="max", patience=0, min_delta=1.0, check_on_train_epoch_end=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=5), callbacks=[callback, stopper])
    trainer.fit(TinyNet(), loader(32, 1))
    assert stopper.stopped_epoch == 1
    assert [entry["epoch"] for entry in callback.history] == [0, 1]


def test_every_n_epochs(tmp_path: Path) -> None:
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(16, 0), every_n_epochs=2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=5, limit_train_batches=1), callbacks=[callback])
    trainer.fit(TinyNet(), loader(32, 1))
    assert [entry["epoch"] for entry in callback.history] == [1, 3]
    assert [entry["global_step"] for entry in callback.history] == [2, 4]


# --------------------------------------------------------------------------- exact values


def independent_curve(model: PlainMLP, data: TensorDataset, measured: list[float],
                      prune_output: bool = False) -> list[float]:
    """Global magnitude pruning by hand: zero the k smallest |w| over the pruned weights (the hidden one, and the
    output one with ``prune_output``), k from the measured sparsity."""
    weights = [model.hidden.weight.detach(), model.out.weight.detach()]
    pruned = weights if prune_output else weights[:1]
    flat = torch.cat([w.flatten().abs() for w in pruned])
    x, y = data.tensors
    accuracies = []
    for fraction in measured:
        k = round(fraction * flat.numel())
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat)[:k]] = False
        masks = keep.split([w.numel() for w in pruned])
        w1, w2 = [w * m.view_as(w) for w, m in zip(pruned, masks, strict=True)] + weights[len(pruned):]
        logits = torch.relu(x @ w1.T) @ w2.T
        accuracies.append((logits.argmax(1) == y).double().mean().item())
    return accuracies


@pytest.mark.parametrize("params", [None, "weights"])
def test_exact_metric_at_each_level_against_independent_computation(tmp_path: Path, params: str | None) -> None:
    data = dataset(50, seed=7)
    callback = PruneEvalCallback(sparsities=(0.0, 0.3, 0.6, 0.9), dataloader=DataLoader(data, batch_size=16),
                                 params=params)
    model = PlainMLP()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[callback])
    trainer.fit(model, loader(32, 1))  # the last evaluation saw the final weights: nothing trains after it
    curve = callback.history[-1]["curves"]["global"]
    prune_output = params == "weights"  # the default leaves the output layer alone
    assert curve["params"] == (["hidden.weight", "out.weight"] if prune_output else ["hidden.weight"])
    n = model.hidden.weight.numel() + (model.out.weight.numel() if prune_output else 0)
    for requested, measured in zip(curve["requested"], curve["sparsities"], strict=True):
        assert abs(measured - requested) <= 1.0 / n
    expected = independent_curve(model, data, curve["sparsities"], prune_output)
    assert curve["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert len(set(expected)) > 1
    # what was logged is what the history holds
    metrics = trainer.callback_metrics
    for name, value in zip(callback.level_names, curve["metrics"]["accuracy"], strict=True):
        assert metrics[f"pruning/global/accuracy@{name}"].item() == pytest.approx(value, abs=1e-6)
        assert f"pruning/accuracy@{name}" not in metrics  # no short-name copy
    xs, ys = curve["sparsities"], expected
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)) / (xs[-1] - xs[0])
    assert callback.history[-1]["auc"]["global"] == pytest.approx(area, abs=1e-6)
    assert metrics["pruning/auc"].item() == pytest.approx(area, abs=1e-6)


def dict_forward(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return model(batch["features"]), batch["label"]


def test_custom_metrics_forward_fn_and_several_methods(tmp_path: Path) -> None:
    data = dataset(30, seed=9)
    dict_batches = [{"features": x, "label": y} for x, y in DataLoader(data, batch_size=8)]
    callback = PruneEvalCallback(
        sparsities=(0.0, 0.5),
        method=("neuron", "global"),
        dataloader=dict_batches,
        metrics=counting_metrics(),
        forward_fn=dict_forward,
        auc_metric="accuracy",
    )
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    trainer.fit(TinyNet(), loader(32, 1))
    entry = callback.history[0]
    assert list(entry["curves"]) == ["neuron", "global"]
    assert entry["curves"]["global"]["metrics"]["count"] == [30, 30]
    metrics = trainer.callback_metrics
    neuron = entry["curves"]["neuron"]["metrics"]
    assert metrics["pruning/neuron/accuracy@0.50"].item() == pytest.approx(neuron["accuracy"][1], abs=1e-6)
    assert metrics["pruning/neuron/count@0.50"].item() == 30
    assert metrics["pruning/global/count@0.50"].item() == 30
    assert metrics["pruning/auc"].item() == pytest.approx(entry["auc"]["neuron"], abs=1e-6)
    assert metrics["pruning/global/auc"].item() == pytest.approx(entry["auc"]["global"], abs=1e-6)
    assert "pruning/neuron/measured_sparsity@0.50" in metrics
    assert any(name.startswith("pruning/fraction_prunable/") for name in metrics)


def test_unknown_auc_metric_is_a_clear_error(tmp_path: Path) -> None:
    # known names (the default metric, a MetricCollection's keys): at construction
    with pytest.raises(ValueError, match=r"`auc_metric` must be one of \['accuracy'\] .* got 'f1'"):
        PruneEvalCallback(sparsities=(0.0, 0.5), auc_metric="f1")
    collection = MetricCollection({"acc": MulticlassAccuracy(num_classes=3)})
    with pytest.raises(ValueError, match=r"one of \['acc'\]"):
        PruneEvalCallback(metrics=collection, auc_metric="accuracy")
    # a single Metric's names are known only once it has computed: at the first evaluation
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(16, 0), auc_metric="f1",
                                 metrics=MulticlassAccuracy(num_classes=3))
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    with pytest.raises(ValueError, match=r"`auc_metric` must be one of \['MulticlassAccuracy'\] .* got 'f1'"):
        trainer.fit(TinyNet(), loader(32, 1))


# --------------------------------------------------------------------------- logging, files, state


def custom_scalars_layouts(log_dir: str) -> list[Any]:
    """The custom-scalars layouts written into a TensorBoard run directory, parsed."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    layouts = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    layouts.append(layout_pb2.Layout.FromString(value.tensor.string_val[0]))
    return layouts


def test_tensorboard_event_file_has_scalars_and_curve_images(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    callback = PruneEvalCallback(sparsities=LEVELS, method=("global", "neuron"), dataloader=loader(24, 0))
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger), callbacks=[callback])
    trainer.fit(TinyNet(), loader(32, 1))
    logger.experiment.flush()
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    for tag in (
        "pruning/auc",
        "pruning/global/accuracy@0.95",
        "pruning/global/accuracy@0.50",
        "pruning/neuron/accuracy@0.80",
        "pruning/neuron/auc",
        "pruning/global/measured_sparsity@0.95",
        "pruning/fraction_prunable/total",
    ):
        assert tag in tags["scalars"], tag
    auc_events = accumulator.Scalars("pruning/auc")
    assert [event.step for event in auc_events] == [1, 3]  # Lightning logs epoch-end values at the last step's step
    assert [event.value for event in auc_events] == pytest.approx([e["auc"]["global"] for e in callback.history])
    assert {"pruning/global/curve", "pruning/neuron/curve"} <= set(tags["images"])
    # the custom-scalars layout, read back from the event file: one chart per method and metric, written once
    layouts = custom_scalars_layouts(logger.log_dir)
    assert len(layouts) == 1
    charts = {chart.title: list(chart.multiline.tag) for category in layouts[0].category for chart in category.chart}
    assert charts["neuron: accuracy at every level"] == ["^pruning/neuron/accuracy@"]
    assert charts["global: accuracy at every level"] == ["^pruning/global/accuracy@"]
    assert "best-k relative error" in charts and "fraction prunable (epsilon point)" in charts
    images = accumulator.Images("pruning/global/curve")
    assert [image.step for image in images] == [1, 3]  # the scalars' steps
    assert all(image.width > 100 and image.height > 100 for image in images)
    assert images[1].encoded_image_string != images[0].encoded_image_string  # the second holds both epochs
    assert (Path(logger.log_dir) / "prune_eval.json").is_file()
    assert (Path(logger.log_dir) / "prune_eval.csv").is_file()


def test_csv_logger_and_history_files(tmp_path: Path) -> None:
    logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    callback = PruneEvalCallback(sparsities=(0.0, 0.5, 0.9), method=("global", "layerwise"), dataloader=loader(24, 0))
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger), callbacks=[callback])
    trainer.fit(TinyNet(), loader(32, 1))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [row for row in rows if row.get("pruning/auc")]
    assert len(logged) == 2
    assert float(logged[-1]["pruning/layerwise/accuracy@0.90"]) == pytest.approx(
        callback.history[-1]["curves"]["layerwise"]["metrics"]["accuracy"][2], abs=1e-6
    )
    with open(Path(logger.log_dir) / "prune_eval.csv") as f:
        history_rows = list(csv.DictReader(f))
    assert len(history_rows) == 2 * 2 * 3 + 2  # epochs x methods x levels, and the epsilon point of each epoch
    assert list(history_rows[0]) == ["epoch", "global_step", "method", "requested", "sparsity", "accuracy",
                                     "epsilon_ratio"]
    last = [row for row in history_rows if row["epoch"] == "1" and row["method"] == "global"]
    assert [float(row["accuracy"]) for row in last] == callback.history[1]["curves"]["global"]["metrics"]["accuracy"]
    assert [float(row["sparsity"]) for row in last] == callback.history[1]["curves"]["global"]["sparsities"]


def test_no_logger_writes_history_into_default_root_dir(tmp_path: Path) -> None:
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(16, 0), filename="curves")
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[callback])
    trainer.fit(TinyNet(), loader(32, 1))
    with open(tmp_path / "curves.json") as f:
        written = json.load(f)
    assert written["methods"] == ["global"]
    assert written["history"] == json.loads(json.dumps(callback.history))
    assert len(written["history"]) == 2
    assert (tmp_path / "curves.csv").is_file()
    assert not (tmp_path / "prune_eval.json").exists()


def test_filename_none_writes_nothing(tmp_path: Path) -> None:
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(16, 0), filename=None)
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    trainer.fit(TinyNet(), loader(32, 1))
    assert len(callback.history) == 1
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.csv"))


def test_state_dict_round_trip_and_defaults() -> None:
    callback = PruneEvalCallback()
    callback.history = [{"epoch": 0, "global_step": 3, "curves": {}, "compressibility": {}, "auc": {"global": 0.5}}]
    state = callback.state_dict()
    callback.history[0]["epoch"] = 99  # the state is a copy
    fresh = PruneEvalCallback()
    fresh.load_state_dict(state)
    assert fresh.history[0]["epoch"] == 0 and fresh.history[0]["auc"] == {"global": 0.5}
    fresh.load_state_dict({})  # older or foreign checkpoints: defaults
    assert fresh.history == []
    fresh.load_state_dict({"history": [{"epoch": 2}]})
    assert fresh.history == [
        {"epoch": 2, "global_step": -1, "curves": {}, "compressibility": {}, "auc": {}, "auc_metric": "accuracy",
         "at_epsilon": {}}
    ]


def test_resume_from_checkpoint_continues_the_history(tmp_path: Path) -> None:
    data = loader(24, 0)
    first = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=data, compressibility=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, enable_checkpointing=True), callbacks=[first, checkpoint])
    trainer.fit(TinyNet(), loader(32, 1))
    resumed = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=data, compressibility=False)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[resumed])
    trainer.fit(TinyNet(), loader(32, 1), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [entry["epoch"] for entry in resumed.history] == [0, 1]
    assert resumed.history[0] == first.history[0]
    with open(tmp_path / "prune_eval.json") as f:
        assert [entry["epoch"] for entry in json.load(f)["history"]] == [0, 1]


# --------------------------------------------------------------------------- distributed: real 2-process DDP


def test_evaluation_leaves_the_global_rng_and_so_the_training_unchanged(tmp_path: Path) -> None:
    def train(with_callback: bool) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = TinyNet()
        data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=8, shuffle=True)
        callbacks = [PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(16, 0))] if with_callback else []
        Trainer(**trainer_kwargs(tmp_path, max_epochs=3), callbacks=callbacks).fit(model, data)
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain, evaluated = train(False), train(True)
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)


class CountingDataModule(LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return loader(32, seed=1)

    def test_dataloader(self) -> DataLoader:
        return loader(35, seed=11, batch_size=4)  # 9 batches, the last of 3: uneven over 2 ranks


class DumpPerRank(Callback):
    """Every rank writes what it holds (histories, logged metrics, weights) to a file of its own."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        held = {
            "histories": {cb.log_prefix: cb.history for cb in trainer.callbacks if isinstance(cb, PruneEvalCallback)},
            "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "world_size": trainer.world_size,
        }
        torch.save(held, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes_every_rank_gets_the_single_process_curve(tmp_path: Path) -> None:
    given = PruneEvalCallback(
        sparsities=LEVELS,
        method=("global", "neuron"),
        dataloader=loader(37, seed=10, batch_size=4),  # 10 batches, the last of 1
        metrics=counting_metrics(),
        log_prefix="given",
    )
    from_datamodule = PruneEvalCallback(sparsities=LEVELS, metrics=counting_metrics(), log_prefix="dm")
    as_list = PruneEvalCallback(  # not a DataLoader: every rank reads all, keeps every 2nd batch
        sparsities=LEVELS,
        dataloader=list(loader(29, seed=12, batch_size=4)),
        metrics=counting_metrics(),
        log_prefix="list",
    )
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, devices=2, strategy="ddp_spawn"),
        callbacks=[given, from_datamodule, as_list, DumpPerRank(str(tmp_path))],
    )
    trainer.fit(PlainMLP(), datamodule=CountingDataModule())
    held = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [h["world_size"] for h in held] == [2, 2]
    # every rank holds the same weights, histories and logged values
    for key in held[0]["state_dict"]:
        assert torch.equal(held[0]["state_dict"][key], held[1]["state_dict"][key])
    # compared as JSON, where NaN (a per-unit tail index of the 3-unit output layer) equals NaN
    assert json.dumps(held[0]["histories"], sort_keys=True) == json.dumps(held[1]["histories"], sort_keys=True)
    logged = [json.dumps({k: float(v) for k, v in h["callback_metrics"].items()}, sort_keys=True) for h in held]
    assert logged[0] == logged[1]
    histories = held[0]["histories"]
    assert [len(histories[p]) for p in ("given", "dm", "list")] == [1, 1, 1]
    # no sample duplicated or lost: the synced count is the dataset size at every level
    assert histories["given"][-1]["curves"]["global"]["metrics"]["count"] == [37] * len(LEVELS)
    assert histories["dm"][-1]["curves"]["global"]["metrics"]["count"] == [35] * len(LEVELS)
    assert histories["list"][-1]["curves"]["global"]["metrics"]["count"] == [29] * len(LEVELS)
    # equal to the single-process curve on the same data and weights
    model = PlainMLP()
    model.load_state_dict(held[0]["state_dict"])
    for prefix, data, methods in (
        ("given", loader(37, seed=10, batch_size=4), ("global", "neuron")),
        ("dm", loader(35, seed=11, batch_size=4), ("global",)),
        ("list", loader(29, seed=12, batch_size=4), ("global",)),
    ):
        for method in methods:
            single = evaluate_pruning_curve(model, data, LEVELS, method=method, metrics=counting_metrics())
            assert histories[prefix][-1]["curves"][method] == single.to_dict(), (prefix, method)
        # the epsilon point too, its count showing that it also saw every sample once
        point = evaluate_at_epsilon(model, data, metrics=counting_metrics()).to_dict()
        logged = histories[prefix][-1]["at_epsilon"]
        assert {k: v for k, v in logged.items() if k not in ("sparsity", "removed")} == point, prefix
        assert logged["metrics"]["count"] == len(data.dataset)
    assert held[0]["callback_metrics"]["given/auc"] == pytest.approx(histories["given"][-1]["auc"]["global"], abs=1e-6)
    assert math.isfinite(held[0]["callback_metrics"]["dm/fraction_prunable/total"])


# --------------------------------------------------------------------------- issue 8, item 11: what is pruned


def test_default_prunes_neither_the_output_layer_nor_reports_it(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from lightning_heavytail.models import BiasFreeMLP, Classifier

    # the README's snippet: method=("neuron", "global") with every other argument left at its default
    callback = PruneEvalCallback(sparsities=(0.0, 0.5, 0.9), method=("neuron", "global"), dataloader=loader(24, 0))
    model = Classifier(BiasFreeMLP(8, 3, width=16, depth=2), num_classes=3, lr=0.05)
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    with caplog.at_level("INFO"):
        trainer.fit(model, loader(32, 1))
    hidden = ["net.hidden1.weight", "net.hidden2.weight"]
    entry = callback.history[-1]
    assert [entry["curves"][m]["params"] for m in ("neuron", "global")] == [hidden, hidden]
    report_params = {key.split("/", 1)[1] for key in entry["compressibility"] if key.startswith("fraction_prunable/")}
    assert report_params == {*hidden, "total"}  # the report measures what the curves prune: not net.out.weight
    assert "pruning/fraction_prunable/net.out.weight" not in trainer.callback_metrics
    assert "leaves out net.out.weight (the output layer" in caplog.text
    # params="weights" brings the output layer back, in the curves and in the report
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), method="neuron", dataloader=loader(24, 0), params="weights")
    Trainer(**trainer_kwargs(tmp_path), callbacks=[callback]).fit(model, loader(32, 1))
    assert callback.history[-1]["curves"]["neuron"]["params"] == [*hidden, "net.out.weight"]
    assert "fraction_prunable/net.out.weight" in callback.history[-1]["compressibility"]


# --------------------------------------------------------------------------- item 12: unscorable output, at fit start


class DictOutputNet(PlainMLP):
    """A Hugging Face-style model: returns a dict; training reads its loss."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        logits = super().forward(x)
        return {"logits": logits, "hidden_states": torch.relu(self.hidden(x))}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x)["logits"], y)


class Regressor(PlainMLP):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(24, 1, bias=False)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).squeeze(1), y)


def regression_loader(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, x[:, 0] - x[:, 1]), batch_size=8)


class ComplexWeight(PlainMLP):
    def __init__(self) -> None:
        super().__init__()
        self.rotation = nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward((x.to(torch.complex64) @ self.rotation).real)


@pytest.mark.parametrize(
    ("make_model", "data", "kwargs", "match"),
    [
        (DictOutputNet, loader(24, 0), {}, r"returned a dict with keys \['logits', 'hidden_states'\].*output_key="),
        (Regressor, regression_loader(), {},
         r"shape \(N, C\) with C >= 2, got preds of shape \(8, 1\).*MeanSquaredError"),
        (PlainMLP, regression_loader(), {}, r"integer class labels as target, got torch.float32.*regression metric"),
        (PlainMLP, loader(24, 0), {"metrics": MulticlassAccuracy(num_classes=3), "auc_metric": "f1"},
         r"`auc_metric` must be one of \['MulticlassAccuracy'\] .* got 'f1'"),
        (ComplexWeight, loader(24, 0), {"params": "weights"}, r"complex tensors \['rotation'\]"),
    ],
)
def test_what_cannot_be_scored_stops_the_run_at_fit_start(tmp_path: Path, make_model: Any, data: DataLoader,
                                                          kwargs: dict[str, Any], match: str) -> None:
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=data, **kwargs)
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, loader(32, 1) if make_model is not Regressor else regression_loader(32))
    assert trainer.global_step == 0  # before the first training step, not after an epoch
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_output_key_reads_the_logits_of_a_dict_output(tmp_path: Path) -> None:
    callback = PruneEvalCallback(sparsities=(0.0, 0.5, 0.9), method=("global", "neuron", "structured"),
                                 dataloader=loader(24, 0), output_key="logits")
    model = DictOutputNet()
    Trainer(**trainer_kwargs(tmp_path), callbacks=[callback]).fit(model, loader(32, 1))
    plain = PlainMLP()
    plain.load_state_dict(model.state_dict())
    for method in ("global", "neuron", "structured"):
        reference = evaluate_pruning_curve(plain, loader(24, 0), (0.0, 0.5, 0.9), method=method)
        assert callback.history[-1]["curves"][method] == reference.to_dict()


def test_a_regression_model_is_scored_with_a_regression_metric(tmp_path: Path) -> None:
    from torchmetrics import MeanSquaredError

    callback = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=regression_loader(),
                                 forward_fn=lambda m, b: (m(b[0]).squeeze(1), b[1]), metrics=MeanSquaredError())
    Trainer(**trainer_kwargs(tmp_path), callbacks=[callback]).fit(Regressor(), regression_loader(32))
    mse = callback.history[-1]["curves"]["global"]["metrics"]["MeanSquaredError"]
    assert len(mse) == 2 and all(math.isfinite(v) and v > 0 for v in mse)


# --------------------------------------------------------------------------- item 15: several callbacks


def test_callbacks_with_distinct_prefixes_write_distinct_history_files(tmp_path: Path) -> None:
    first = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(24, 0), compressibility=False)
    second = PruneEvalCallback(sparsities=(0.0, 0.9), method="neuron", dataloader=loader(24, 0),
                               compressibility=False, log_prefix="eval/paper")
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[first, second])
    trainer.fit(TinyNet(), loader(32, 1))
    assert (first.history_stem, second.history_stem) == ("prune_eval", "prune_eval_eval_paper")
    for callback in (first, second):
        with open(tmp_path / f"{callback.history_stem}.json") as f:
            written = json.load(f)
        assert written["methods"] == list(callback.methods)
        assert written["history"] == json.loads(json.dumps(callback.history))
        assert (tmp_path / f"{callback.history_stem}.csv").is_file()
    assert "eval/paper/neuron/accuracy@0.90" in trainer.callback_metrics


@pytest.mark.parametrize(
    ("second", "match"),
    [
        ({"method": "neuron"}, r"Two PruneEvalCallbacks have `log_prefix`='pruning'"),
        ({"log_prefix": "a_b"}, r"same history files prune_eval_a_b.json"),  # the first one's prefix is "a/b"
    ],
)
def test_callbacks_that_would_overwrite_each_other_are_refused_at_setup(tmp_path: Path, second: dict[str, Any],
                                                                       match: str) -> None:
    first_kwargs = {"log_prefix": "a/b"} if "log_prefix" in second else {}
    callbacks = [PruneEvalCallback(dataloader=loader(24, 0), **first_kwargs),
                 PruneEvalCallback(dataloader=loader(24, 0), **second)]
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=callbacks)
    with pytest.raises(ValueError, match=match):
        trainer.fit(TinyNet(), loader(32, 1))
    assert trainer.global_step == 0


# --------------------------------------------------------------------------- item 16: levels past two decimals


def test_levels_past_two_decimals_get_their_own_tags_and_report_keys(tmp_path: Path) -> None:
    callback = PruneEvalCallback(sparsities=(0, 0.9, 0.99, 0.995), dataloader=loader(24, 0))
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    trainer.fit(PlainMLP(), loader(32, 1))
    metrics = trainer.callback_metrics
    curve = callback.history[-1]["curves"]["global"]
    for label, value in zip(("0.00", "0.90", "0.99", "0.995"), curve["metrics"]["accuracy"], strict=True):
        assert metrics[f"pruning/global/accuracy@{label}"].item() == pytest.approx(value, abs=1e-6)
    report = callback.history[-1]["compressibility"]
    assert {f"best_k_error@{label}/total" for label in ("0.90", "0.99", "0.995")} <= set(report)
    assert report["best_k_error@0.995/total"] > report["best_k_error@0.99/total"]  # two levels, two values
    assert metrics["pruning/best_k_error@0.995/total"].item() == pytest.approx(report["best_k_error@0.995/total"])


# --------------------------------------------------------------------------- item 13: DDP with BatchNorm


class BatchNormNet(PlainMLP):
    """BatchNorm with momentum 1: its running statistics are those of the last training batch the rank saw.

    Each rank trains on its own data (run with ``use_distributed_sampler=False``): rank 0's inputs shifted by +3,
    rank 1's by -3, so the ranks' statistics differ widely.
    """

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(24, momentum=1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.norm(self.hidden(x))))

    def train_dataloader(self) -> DataLoader:
        x, y = dataset(32, seed=1).tensors
        shift = 3.0 if self.trainer.global_rank == 0 else -3.0
        return DataLoader(TensorDataset(x + shift, y), batch_size=4)


class DumpBuffers(Callback):
    """Every rank writes its buffers at the end of the epoch (place it before PruneEvalCallback)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        buffers = {k: v.detach().clone() for k, v in pl_module.named_buffers()}
        torch.save(buffers, os.path.join(self.directory, f"buffers{trainer.global_rank}.pt"))


@pytest.mark.slow
def test_ddp_with_batchnorm_logs_the_curve_of_the_saved_model(tmp_path: Path) -> None:
    callback = PruneEvalCallback(sparsities=LEVELS, method=("global", "neuron"), dataloader=loader(37, 10, 4),
                                 compressibility=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, devices=2, strategy="ddp_spawn", enable_checkpointing=True,
                         use_distributed_sampler=False),
        callbacks=[DumpBuffers(str(tmp_path)), callback, checkpoint, DumpPerRank(str(tmp_path))],
    )
    torch.manual_seed(0)
    trainer.fit(BatchNormNet())
    before = [torch.load(tmp_path / f"buffers{r}.pt") for r in range(2)]
    held = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # the ranks' running statistics really differ (else this test proves nothing) ...
    assert (before[0]["norm.running_mean"] - before[1]["norm.running_mean"]).abs().max() > 1.0
    # ... and each rank got its own back after the evaluation
    for rank in range(2):
        for key, value in before[rank].items():
            assert torch.equal(held[rank]["state_dict"][key], value), (rank, key)
    # the logged curve is the single-process curve of the checkpointed model (rank 0's buffers), on every rank
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(saved["norm.running_mean"], before[0]["norm.running_mean"])
    model = BatchNormNet()
    model.load_state_dict(saved)
    for method in ("global", "neuron"):
        single = evaluate_pruning_curve(model, loader(37, 10, 4), LEVELS, method=method)
        for rank in range(2):
            assert held[rank]["histories"]["pruning"][-1]["curves"][method] == single.to_dict(), (rank, method)
    point = evaluate_at_epsilon(model, loader(37, 10, 4)).to_dict()
    for rank in range(2):
        logged = held[rank]["histories"]["pruning"][-1]["at_epsilon"]
        assert {k: v for k, v in logged.items() if k not in ("sparsity", "removed")} == point, rank
    # with rank 1's statistics the same model scores differently: what the curve would be without the fix
    model.load_state_dict({**saved, **{k: v for k, v in before[1].items()}})
    other = evaluate_pruning_curve(model, loader(37, 10, 4), LEVELS, method="global")
    assert other.metrics != held[0]["histories"]["pruning"][-1]["curves"]["global"]["metrics"]


# --------------------------------------------------------------------------- item 17: mid-epoch resume, as documented


class RecordingNet(PlainMLP):
    """Records the sample ids of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, ids = batch
        self.seen.append(ids.tolist())
        return self(x).pow(2).mean()


def test_mid_epoch_resume_replays_the_epochs_first_batches_as_the_docs_say(tmp_path: Path) -> None:
    from lightning_heavytail import HeavyTailNoiseCallback

    data = DataLoader(TensorDataset(torch.randn(12, 8, generator=torch.Generator().manual_seed(1)), torch.arange(12)),
                      batch_size=2)  # 6 batches per epoch

    def run(ckpt_path: str | None = None, every_step: bool = False) -> tuple[RecordingNet, list[Callback]]:
        torch.manual_seed(0)
        model = RecordingNet()
        callbacks: list[Callback] = [
            HeavyTailNoiseCallback(alpha=1.8, sigma=0.1, seed=0, params="weights"),
            PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(8, 0), compressibility=False, log_figure=False),
        ]
        if every_step:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                             filename="{step}"))
        trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=None,
                                           enable_checkpointing=every_step), callbacks=callbacks)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, callbacks

    full, full_callbacks = run(every_step=True)
    mid, mid_callbacks = run(str(tmp_path / "ckpt" / "step=7.ckpt"))  # one batch into the second epoch
    # the resumed run trains steps 7-11 on the epoch's data from its first batch: [0, 1] again, [10, 11] never
    assert full.seen[7:] == [[2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert mid.seen == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert not torch.equal(full.hidden.weight, mid.hidden.weight)
    # what holds: the step count and the noise counter, the epochs evaluated
    assert mid_callbacks[0].noise_step == full_callbacks[0].noise_step == 12
    assert [e["epoch"] for e in mid_callbacks[1].history] == [e["epoch"] for e in full_callbacks[1].history] == [0, 1]
    # from the checkpoint at the epoch's end the resumed run is the uninterrupted one, bitwise
    end, _ = run(str(tmp_path / "ckpt" / "step=6.ckpt"))
    assert end.seen == full.seen[6:] and torch.equal(full.hidden.weight, end.hidden.weight)
    # and the docs quote exactly this measurement
    docs = (Path(__file__).parents[2] / "docs" / "noise_callback.md").read_text()
    assert "resumed run trained steps 7-11 on samples `[0,1] [2,3] [4,5] [6,7] [8,9]`" in docs
    assert "uninterrupted one on `[2,3] [4,5] [6,7] [8,9] [10,11]`" in docs


# --------------------------------------------------------------------------- issue 9: the epsilon point


class TwoHidden(LightningModule):
    """Bias-free, two hidden layers of different widths: the epsilon point prunes them to different ratios."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 30, bias=False), nn.Linear(30, 20, bias=False), nn.Linear(20, 3)
        with torch.no_grad():  # very unequal rows, as heavy-tailed training leaves them
            self.fc1.weight.mul_(torch.logspace(-2, 1, 30).unsqueeze(1))
            self.fc2.weight.mul_(torch.logspace(-1.5, 0.5, 20).unsqueeze(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_epsilon_point_logged_against_an_independent_computation_and_the_core(tmp_path: Path, epsilon: float) -> None:
    torch.manual_seed(0)
    data = dataset(60, seed=7)
    logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    callback = PruneEvalCallback(sparsities=(0.0, 0.5, 0.9), method=("neuron", "global", "structured"),
                                 dataloader=DataLoader(data, batch_size=16), epsilon=epsilon)
    model = TwoHidden()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger), callbacks=[callback])
    trainer.fit(model, loader(32, 1))  # the last evaluation saw the final weights
    point = callback.history[-1]["at_epsilon"]
    # by hand: each hidden layer's rows within epsilon zeroed, the output layer never, the model run once
    weights = {"fc1.weight": model.fc1.weight.detach(), "fc2.weight": model.fc2.weight.detach()}
    rows = {name: rows_to_prune(w.numpy(), epsilon) for name, w in weights.items()}  # the criterion in plain Python
    ratios = {name: len(rows[name]) / w.shape[0] for name, w in weights.items()}
    assert point["ratios"] == ratios
    assert 0.0 < ratios["fc2.weight"] < ratios["fc1.weight"] < 1.0  # two different ratios, neither trivial
    assert point["ratio"] == (len(rows["fc1.weight"]) + len(rows["fc2.weight"])) / 50
    w1, w2 = weights["fc1.weight"].clone(), weights["fc2.weight"].clone()
    w1[rows["fc1.weight"]] = 0.0
    w2[rows["fc2.weight"]] = 0.0
    x, y = data.tensors
    with torch.no_grad():
        logits = model.out(torch.relu(torch.relu(x @ w1.T) @ w2.T))
    accuracy = (logits.argmax(1) == y).double().mean().item()
    assert point["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    # where the star goes: the share of the pruned entries zeroed, and of all parameters
    zeroed = len(rows["fc1.weight"]) * 8 + len(rows["fc2.weight"]) * 30
    assert point["sparsity"] == pytest.approx(zeroed / (30 * 8 + 20 * 30))
    assert point["removed"] == pytest.approx(zeroed / sum(p.numel() for p in model.parameters()))
    # the functional core gives the same point; the report's fraction prunable is the same ratio
    core = evaluate_at_epsilon(model, DataLoader(data, batch_size=16), epsilon=epsilon)
    assert {k: v for k, v in point.items() if k not in ("sparsity", "removed")} == core.to_dict()
    assert point["ratio"] == callback.history[-1]["compressibility"]["fraction_prunable/total"]
    # logged under the prefix, per layer too
    metrics = trainer.callback_metrics
    assert metrics["pruning/at_epsilon/accuracy"].item() == pytest.approx(accuracy, abs=1e-6)
    assert metrics["pruning/at_epsilon/ratio"].item() == pytest.approx(point["ratio"])
    for name, ratio in ratios.items():
        assert metrics[f"pruning/at_epsilon/ratio/{name}"].item() == pytest.approx(ratio)
    assert "pruning/at_epsilon/ratio/out.weight" not in metrics
    # the files mark it: a JSON field and a CSV row per epoch
    with open(Path(logger.log_dir) / "prune_eval.json") as f:
        assert json.load(f)["history"][-1]["at_epsilon"] == json.loads(json.dumps(point))
    with open(Path(logger.log_dir) / "prune_eval.csv") as f:
        rows_csv = [row for row in csv.DictReader(f) if row["method"] == "at_epsilon"]
    assert [row["epoch"] for row in rows_csv] == ["0", "1"]
    assert float(rows_csv[-1]["requested"]) == epsilon and float(rows_csv[-1]["epsilon_ratio"]) == point["ratio"]
    assert float(rows_csv[-1]["accuracy"]) == point["metrics"]["accuracy"]
    assert float(rows_csv[-1]["sparsity"]) == point["sparsity"]


def test_epsilon_point_follows_the_prefix_and_can_be_turned_off(tmp_path: Path) -> None:
    named = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(24, 0), log_prefix="eval", compressibility=False)
    off = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(24, 0), epsilon_point=False, filename=None)
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[named, off])
    trainer.fit(PlainMLP(), loader(32, 1))
    assert {"eval/at_epsilon/accuracy", "eval/at_epsilon/ratio"} <= set(trainer.callback_metrics)
    assert "eval/at_epsilon/ratio/hidden.weight" not in trainer.callback_metrics  # one layer: the overall ratio
    assert not any(name.startswith("pruning/at_epsilon") for name in trainer.callback_metrics)
    assert off.history[-1]["at_epsilon"] == {}
    with pytest.raises(TypeError, match="`epsilon_point` must be True or False"):
        PruneEvalCallback(epsilon_point=1)  # type: ignore[arg-type]


def test_the_svd_method_in_the_callback_is_the_functional_curve(tmp_path: Path) -> None:
    callback = PruneEvalCallback(sparsities=(0.0, 0.5, 0.9), method=("svd", "neuron"), dataloader=loader(24, 0),
                                 filename=None)
    model = PlainMLP()
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[callback])
    trainer.fit(model, loader(32, 1))
    reference = evaluate_pruning_curve(model, loader(24, 0), (0.0, 0.5, 0.9), method="svd")
    assert callback.history[-1]["curves"]["svd"] == reference.to_dict()
    assert reference.params == ["hidden.weight"] and reference.sparsities == [0.0, 0.5, 0.875]  # of 8 values
    assert trainer.callback_metrics["pruning/svd/measured_sparsity@0.90"] == pytest.approx(0.875)
    assert float(trainer.callback_metrics["pruning/svd/accuracy@0.50"]) == pytest.approx(
        reference.metrics["accuracy"][1])


def test_what_cannot_prune_sharded_parameters_is_refused_at_setup() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    # Lightning refuses FSDP on the CPU when the Trainer is built: the setup hook is given the strategy alone
    for strategy in (FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)):
        with pytest.raises(ValueError, match=f"PruneEvalCallback does not support {type(strategy).__name__}: it shards"
                                             r" parameters.*ModelParallelStrategy\(data_parallel_size=N,"
                                             r" tensor_parallel_size=1\) with torch.distributed.fsdp.fully_shard"):
            PruneEvalCallback(dataloader=loader(8, 0)).setup(SimpleNamespace(strategy=strategy, callbacks=[]),
                                                             PlainMLP(), "fit")  # type: ignore[arg-type]

    def fsdp2(tensor_parallel_size: int) -> Trainer:
        return Trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=tensor_parallel_size),
                       logger=False, enable_progress_bar=False)

    PruneEvalCallback(method=("global", "neuron"), dataloader=loader(8, 0)).setup(fsdp2(1), PlainMLP(), "fit")
    for methods, match in ((("neuron", "structured"), r"method \['structured'\] cannot prune the sharded parameters"),
                           (("svd",), r"method \['svd'\].*Use the mask methods \('global', 'layerwise', 'neuron'\)")):
        with pytest.raises(ValueError, match=match):
            PruneEvalCallback(method=methods, dataloader=loader(8, 0)).setup(fsdp2(1), PlainMLP(), "fit")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=1 \(FSDP2 sharding alone\), got"
                                         r" tensor_parallel_size=2"):
        PruneEvalCallback(dataloader=loader(8, 0)).setup(fsdp2(2), PlainMLP(), "fit")


def test_missing_optional_packages_are_named_with_their_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_utilities.core.imports import RequirementCache

    from lightning_heavytail._extras import REQUIREMENTS

    monkeypatch.setitem(REQUIREMENTS, "structured", RequirementCache("torch-pruning-not-installed-here"))
    with pytest.raises(ModuleNotFoundError, match=r"method='structured'.*'lightning-heavytail\[structured\]'"):
        PruneEvalCallback(method=["neuron", "structured"])  # at construction
    monkeypatch.setitem(REQUIREMENTS, "figures", RequirementCache("matplotlib-not-installed-here"))
    callback = PruneEvalCallback(dataloader=loader(8, 0))
    logger = TensorBoardLogger(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match=r"log_figure=True.*'lightning-heavytail\[figures\]'"):
        callback.setup(Trainer(logger=logger, enable_progress_bar=False), PlainMLP(), "fit")  # at setup
    PruneEvalCallback(dataloader=loader(8, 0), log_figure=False).setup(Trainer(logger=logger), PlainMLP(), "fit")
