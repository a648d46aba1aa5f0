"""Run every example in its smoke mode and check what it produced, not only that it exited."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_heavytail import HeavyTailNoiseCallback, PruneEvalCallback
from lightning_heavytail.data import CIFAR10_FILES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _load(name: str):
    """Import examples/{name}.py as a module (examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect.getsource and pickling look classes up there
    spec.loader.exec_module(module)
    return module


def _tensorboard(log_dir: str | Path) -> EventAccumulator:
    events = list(Path(log_dir).glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {log_dir}"
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_existing_trainer_smoke(tmp_path):
    example = _load("existing_trainer")
    # the point of the example: the LightningModule itself knows nothing about this package
    assert "heavytail" not in inspect.getsource(example.DigitsMLP)

    result = example.main(["--smoke", "--out", str(tmp_path)])

    assert result["noise_steps"] == 6  # 2 epochs x limit_train_batches=3 real SGD steps
    assert result["epochs_evaluated"] == [0, 1]
    assert result["sparsities"][0] == 0.0 and result["sparsities"][-1] == pytest.approx(0.95, abs=0.01)
    assert all(0.0 <= a <= 1.0 for a in result["accuracy_global"] + result["accuracy_neuron"])
    assert json.loads((tmp_path / "results.json").read_text()) == result

    # ModelCheckpoint monitored the callback's pruning/auc and kept the best epoch's checkpoint
    ckpt_path = Path(result["best_checkpoint"])
    assert ckpt_path.is_file() and ckpt_path.parent == tmp_path / "checkpoints"
    history = json.loads((Path(result["log_dir"]) / "prune_eval.json").read_text())["history"]
    aucs = [entry["auc"]["global"] for entry in history]
    assert result["best_auc"] == pytest.approx(max(aucs), rel=1e-6)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    noise_state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("HeavyTailNoiseCallback"))
    assert noise_state["noise_step"] == 3 * (aucs.index(max(aucs)) + 1)  # saved at the end of the best epoch

    tb = _tensorboard(result["log_dir"])
    scalars = set(tb.Tags()["scalars"])
    assert {"pruning/auc", "pruning/global/accuracy@0.90", "pruning/neuron/auc", "heavytail/noise_scale"} <= scalars
    assert "pruning/global/curve" in tb.Tags()["images"]
    # the noise really was applied, at the scale sigma * lr**(1/alpha) of the defaults (0.003, lr 0.1, alpha 1.75)
    scales = [event.value for event in tb.Scalars("heavytail/noise_scale")]
    assert len(scales) == 6 and scales[0] == pytest.approx(0.003 * 0.1 ** (1 / 1.75), rel=1e-6)
    assert all(event.value > 0 for event in tb.Scalars("heavytail/max_abs_noise"))


def test_cli_config_fit_runs_both_callbacks(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["examples/cli.py"])  # LightningCLI warns when pytest's own argv is there too
    cli_module = _load("cli")
    cli = cli_module.main([
        "fit", "--config", str(EXAMPLES / "config.yaml"),
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
    ])

    trainer = cli.trainer
    noise = [c for c in trainer.callbacks if isinstance(c, HeavyTailNoiseCallback)]
    prune = [c for c in trainer.callbacks if isinstance(c, PruneEvalCallback)]
    assert len(noise) == 1 and len(prune) == 1
    noise, prune = noise[0], prune[0]
    # init_args from the YAML reached the callbacks
    assert (noise.alpha, noise.sigma, noise.structure, noise.params) == (1.75, 0.003, "neuron", "paper")
    assert prune.methods == ("global", "neuron") and prune.sparsities[-1] == 0.99
    assert type(cli.model).__name__ == "Classifier" and type(cli.datamodule).__name__ == "ClassificationDataModule"

    assert trainer.global_step == 2 and noise.noise_step == 2
    assert [entry["epoch"] for entry in prune.history] == [0]
    assert prune.data_source == "the datamodule's `test_dataloader()`"
    assert "pruning/auc" in trainer.callback_metrics
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor == "pruning/auc")
    assert Path(checkpoint.best_model_path).is_file()
    tb = _tensorboard(trainer.log_dir)
    assert "pruning/global/accuracy@0.90" in tb.Tags()["scalars"]
    assert (Path(trainer.log_dir) / "config.yaml").is_file()  # LightningCLI saved the resolved config


def test_cli_without_its_extra_names_the_extra(tmp_path):
    # a jsonargparse older than LightningCLI needs shadows the installed one (its metadata come first on the path)
    old = tmp_path / "jsonargparse-4.0.0.dist-info"
    old.mkdir()
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: jsonargparse\nVersion: 4.0.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "examples/cli.py", "fit", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert 'pip install -e ".[cli]"' in proc.stderr and "jsonargparse[signatures]>=4.27.7" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the extra it names exists and installs what LightningCLI checks; the examples' README names it too
    assert 'cli = ["jsonargparse[signatures]>=4.27.7"]' in (ROOT / "pyproject.toml").read_text().splitlines()
    assert 'pip install -e ".[cli]"' in (EXAMPLES / "README.md").read_text()


def _write_fake_cifar10(directory: Path, per_batch: int = 20) -> None:
    """Tiny CIFAR-10 in the real format: pickled dicts with bytes keys, uint8 data (N, 3072), a list of labels."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CIFAR10_FILES:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def test_vgg_cifar_smoke_on_fake_cifar10(tmp_path):
    data_dir = tmp_path / "cifar"
    _write_fake_cifar10(data_dir / "cifar-10-batches-py")
    out = tmp_path / "out"

    result = _load("vgg_cifar").main(["--data-dir", str(data_dir), "--smoke", "--out", str(out)])

    # the paper's selection: every conv kernel but the first, never the output layer
    assert result["noised_params"][0] == "net.features.3.weight"
    assert "net.features.0.weight" not in result["noised_params"]
    assert "net.classifier.weight" not in result["noised_params"]
    assert len(result["noised_params"]) == 7  # 8 convs in vgg11_wide, less the first
    assert result["noise_steps"] == 4  # 2 epochs x 2 batches
    assert result["epochs_evaluated"] == [0, 1]
    assert set(result["curves"]) == {"neuron", "global"}
    assert result["curves"]["neuron"]["sparsity"][-1] == pytest.approx(0.9, abs=0.05)
    assert json.loads((out / "results.json").read_text()) == result
    tb = _tensorboard(result["log_dir"])
    assert {"pruning/auc", "pruning/neuron/accuracy@0.90", "pruning/global/auc"} <= set(tb.Tags()["scalars"])


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing-dir", "empty-dir"])
def test_vgg_cifar_without_data_exits_with_a_clear_message(tmp_path, make_dir):
    data_dir = tmp_path / "cifar"
    if make_dir:
        data_dir.mkdir()
    with pytest.raises(SystemExit) as excinfo:
        _load("vgg_cifar").main(["--data-dir", str(data_dir), "--smoke", "--out", str(tmp_path / "out")])
    message = excinfo.value.code
    assert isinstance(message, str)  # a message as exit code: printed to stderr, exit status 1
    assert "CIFAR-10 not found" in message and str(data_dir) in message and "--data-dir" in message
    assert not (tmp_path / "out").exists()  # failed before building or training anything


@pytest.mark.slow
def test_multi_gpu_two_cpu_processes_ddp(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "examples/multi_gpu.py", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
         "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "ddp_report.json").read_text())

    assert report["world_size"] == 2 and report["strategy"] == "DDPStrategy"
    # noise after every step on both ranks, and the replicas still bitwise equal
    assert report["noise_steps"] == [4, 4]  # 128 samples / 2 ranks / batch 32 = 2 steps per epoch, 2 epochs
    assert len(report["checksums"]) == 2 and report["checksums"][0] == report["checksums"][1]
    # each rank evaluated half of the test set, together exactly all of it, plus its first batch (30 samples in smoke
    # mode) for each output check (one at fit start, one before each evaluation: every level of both methods and the
    # epsilon point run on each batch, loaded once)
    total = report["test_samples"] * report["evaluations"]
    assert report["evaluations"] == 2 * (2 * 5 + 1)  # 2 epochs: 2 methods at 5 levels, and the epsilon point
    assert report["output_checks"] == 1 + 2
    assert report["samples_evaluated"] == [total // 2 + 30 * report["output_checks"]] * 2
    # same synced curve on both ranks, equal to rank 0's single-process evaluation of the whole test set
    assert report["accuracy_per_rank"][0] == report["accuracy_per_rank"][1] == report["accuracy_single_process"]
    assert report["replicas_equal"] and report["curves_equal"]
    assert "final pruning curve" in proc.stdout and proc.stdout.count("final pruning curve") == 1  # rank 0 only


@pytest.mark.slow
def test_fsdp2_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "examples/fsdp2.py", "--accelerator", "cpu", "--devices", "2", "--smoke", "--out",
         str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "fsdp2_report.json").read_text())
    assert report["world_size"] == 2 and report["strategy"] == "ModelParallelStrategy"
    assert report["parameter_type"] == "DTensor"
    assert report["hidden_rows_per_rank"] == [33, 32] and report["hidden_shape"] == [65, 64]  # uneven shards
    assert report["noise_step"] == 4 and report["noised_parameters"] == ["net.hidden1.weight"]
    assert 0.0 <= report["fraction_prunable_hidden"] <= 1.0
    assert proc.stdout.count("rows per rank") == 1  # rank 0 reports
    # PruneEvalCallback under FSDP2: the last epoch's curves, equal to one process evaluating the gathered weights
    assert report["pruning_epoch"] == 1 and sorted(report["pruning"]) == ["global", "neuron"]
    for curve in report["pruning"].values():
        assert len(curve["accuracy"]) == 3 and curve["sparsities"][0] == 0.0 < curve["sparsities"][-1]
    assert report["same_curves_in_one_process"] is True
    assert 0.0 <= report["epsilon_ratio"] <= 1.0
    assert (tmp_path / "prune_eval.json").exists()  # the history, written by rank 0
