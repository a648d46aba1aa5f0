import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_heavytail.cli import DEMO_SPARSITIES, build_parser, main
from tests.helpers import run_in_fresh_python

TINY = ["--epochs", "2", "--width", "32", "--max-train-samples", "256", "--max-test-samples", "120",
        "--batch-size", "64", "--quiet", "--seeds", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buffer, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(errors):
        code = main(["demo", *TINY, "--out", str(out)])
    return code, out, buffer.getvalue(), errors.getvalue()


def spread(values):
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "values": list(values)}


def check_spread(stat, values):
    """The summary's mean and sample standard deviation over the seeds, recomputed with numpy."""
    assert stat["values"] == list(values)
    assert stat["mean"] == pytest.approx(np.mean(values)) and stat["std"] == pytest.approx(np.std(values, ddof=1))


def test_demo_writes_results_consistent_with_history(tiny_run):
    code, out, _, _ = tiny_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {"config", "vanilla", "heavytail", "summary"} <= set(results)
    cfg = results["config"]
    assert (cfg["width"], cfg["epochs"], cfg["dataset"], cfg["structure"]) == (32, 2, "digits", "neuron")
    assert (cfg["model"], cfg["lr"], cfg["sigma"], cfg["alpha"]) == ("meanfield", 0.5, 0.1, 1.75)
    assert cfg["seed_list"] == [0, 1]
    assert cfg["noise_scale"] == pytest.approx(cfg["sigma"] * cfg["lr"] ** (1 / cfg["alpha"]))
    for name in ("vanilla", "heavytail"):
        top = results[name]
        assert [run["seed"] for run in top["runs"]] == top["seeds"] == [0, 1]
        for run in top["runs"]:
            history = json.loads((out / run["log_dir"] / "prune_eval.json").read_text())["history"]
            assert len(history) == 1  # evaluated once, after the final epoch
            last = history[-1]
            assert run["epoch"] == last["epoch"] <= 1 and run["global_step"] == 4 * (last["epoch"] + 1)
            curve = last["curves"]["neuron"]
            assert run["requested"] == list(DEMO_SPARSITIES) == curve["requested"]
            assert run["sparsity"] == curve["sparsities"]
            assert run["accuracy"] == curve["metrics"]["accuracy"]
            fp = run["compressibility"]["fraction_prunable"]
            assert fp == last["compressibility"]["fraction_prunable/total"] and 0.0 <= fp <= 1.0
            # the epsilon point of the final model is the report's fraction prunable (one rule, one model)
            assert run["epsilon_point"]["ratio"] == fp and run["epsilon_point"]["epsilon"] == 0.1
            assert list(run["epsilon_point"]["ratios"]) == ["hidden1.weight"]  # "paper": never the output layer
            # measured neuron sparsity of a 32-unit layer: round(s * 32) / 32 units zeroed
            assert run["sparsity"][1] == pytest.approx(16 / 32)
        # the top-level entries are the means over the seeds
        assert top["accuracy"] == pytest.approx(np.mean([run["accuracy"] for run in top["runs"]], axis=0).tolist())
        assert top["sparsity"] == pytest.approx(np.mean([run["sparsity"] for run in top["runs"]], axis=0).tolist())
        assert top["compressibility"]["fraction_prunable"] == pytest.approx(
            np.mean([run["compressibility"]["fraction_prunable"] for run in top["runs"]]))
        assert top["compressibility"]["epsilon"] == 0.1
        summary = results["summary"][name]
        check_spread(summary["accuracy"], [run["accuracy"][0] for run in top["runs"]])
        check_spread(summary["epsilon_ratio"], [run["epsilon_point"]["ratio"] for run in top["runs"]])
        check_spread(summary["epsilon_accuracy"], [run["epsilon_point"]["metrics"]["accuracy"] for run in top["runs"]])
    check_spread(results["summary"]["vanilla"]["accuracy_at_heavytail_ratio"],
                 [run["accuracy_at_heavytail_ratio"] for run in results["vanilla"]["runs"]])
    assert results["vanilla"]["noise"] is None
    assert results["heavytail"]["noise"]["alpha"] == cfg["alpha"]
    # the noise changed the weights, so the two runs differ
    assert results["vanilla"]["compressibility"] != results["heavytail"]["compressibility"]


def test_vanilla_at_the_heavytail_ratio_is_the_vanilla_model_pruned_to_that_ratio(tiny_run):
    # the demo's number, recomputed: vanilla retrained (deterministic) and pruned to heavytail's per-layer ratios
    import torch

    from lightning_heavytail.cli import DemoConfig
    from lightning_heavytail.demo import demo_datamodule, train_run
    from lightning_heavytail.pruning import evaluate_pruning_curve

    _, out, _, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    run_ht, run_v = results["heavytail"]["runs"][0], results["vanilla"]["runs"][0]
    config = DemoConfig(width=32, epochs=2, batch_size=64, seeds=1, max_train_samples=256, max_test_samples=120,
                        out=str(out / "again"), quiet=True)
    dm = demo_datamodule(config)
    net, record = train_run("vanilla", 0, config, dm)
    assert record["accuracy"] == run_v["accuracy"]
    ratio = run_ht["epsilon_point"]["ratios"]["hidden1.weight"]
    curve = evaluate_pruning_curve(net, dm.test_dataloader(), [ratio], method="neuron", params="paper")
    assert curve.sparsities[0] == pytest.approx(round(ratio * 32) / 32)  # no ties: exactly the same units
    assert run_v["accuracy_at_heavytail_ratio"] == pytest.approx(curve.metrics["accuracy"][0])
    assert isinstance(net, torch.nn.Module)


def test_demo_prints_table_verdict_and_tensorboard_hint(tiny_run):
    _, out, printed, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert "over 2 seed(s) (0, 1)" in printed
    row = next(line for line in printed.splitlines() if "epsilon ratio (hidden units pruned)" in line)
    for name in ("vanilla", "heavytail"):
        stat = summary[name]["epsilon_ratio"]
        assert f"{stat['mean']:.4f} ± {stat['std']:.4f}" in row
    row = next(line for line in printed.splitlines() if "vanilla pruned to the heavytail ratio" in line)
    assert f"{summary['vanilla']['accuracy_at_heavytail_ratio']['mean']:.4f}" in row
    assert "fraction prunable" in printed and "alpha per unit (Mohammadi)" in printed
    assert f"tensorboard --logdir {out}" in printed
    # the printed accuracy at sparsity 0.5 is the measured mean
    row = next(line for line in printed.splitlines() if line.strip().startswith("0.50 |"))
    assert f"{results['vanilla']['accuracy'][1]:.4f}" in row and f"{results['heavytail']['accuracy'][1]:.4f}" in row
    for start in ("more compressible: ", "accuracy held at the epsilon point (within 2 points): "):
        assert any(line.startswith(start) for line in printed.splitlines())
    assert "vanilla pruned to the same ratio" in printed


def make_summary(van_ratio, ht_ratio, ht_acc, ht_eps_acc, van_at_ratio):
    n = len(van_ratio)

    def block(accuracy, ratio, eps_acc):
        return {"accuracy": spread(accuracy), "epsilon_ratio": spread(ratio), "epsilon_accuracy": spread(eps_acc),
                "steps": spread([10] * n)}

    summary = {"vanilla": block([0.9] * n, van_ratio, [0.9] * n), "heavytail": block(ht_acc, ht_ratio, ht_eps_acc)}
    summary["vanilla"]["accuracy_at_heavytail_ratio"] = spread(van_at_ratio)
    runs = [{"reached_stop": True}] * n
    return {"summary": summary, "vanilla": {"runs": runs}, "heavytail": {"runs": runs}}


def test_the_verdict_states_an_effect_only_beyond_the_seed_spread():
    from lightning_heavytail._demo_report import verdict as _verdict

    clear = _verdict(make_summary([0.33, 0.34, 0.35], [0.50, 0.55, 0.60], [0.94, 0.94, 0.95], [0.93, 0.94, 0.94],
                                  [0.935, 0.945, 0.935]))
    assert clear.splitlines()[0].startswith("more compressible: yes")
    assert "accuracy held at the epsilon point (within 2 points): yes" in clear
    assert "within 1.0 points on every seed" in clear
    assert "vanilla pruned to the same ratio is as good" in clear
    noisy = _verdict(make_summary([0.33, 0.34, 0.35], [0.30, 0.45, 0.60], [0.94, 0.94, 0.95], [0.90, 0.91, 0.92],
                                  [0.94, 0.95, 0.945]))
    assert noisy.splitlines()[0].startswith("more compressible: not shown")  # +0.11, spread 0.16
    assert "heavytail worse than vanilla pruned to the same ratio" in noisy
    assert "accuracy held at the epsilon point (within 2 points): no" in noisy
    assert "loses up to 4.0 points (worst seed)" in noisy
    single = _verdict(make_summary([0.34], [0.6], [0.94], [0.93], [0.93]))
    assert single.splitlines()[0].startswith("more compressible: not judged (one seed: no spread)")
    assert "vanilla pruned to the same ratio: not judged" in single


def test_demo_stops_at_the_training_accuracy_and_evaluates_the_final_model(tmp_path, capsys):
    # --stop-at 0.5 is reached within the first epochs: the runs end early, and the pruning evaluation is of the final
    # model (the demo checks this itself: the epsilon ratio must equal the last evaluation's fraction prunable)
    assert main(["demo", "--width", "64", "--max-train-samples", "256", "--max-test-samples", "120", "--seeds", "1",
                 "--stop-at", "0.5", "--epochs", "50", "--quiet", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("vanilla", "heavytail"):
        run = results[name]["runs"][0]
        assert run["reached_stop"] and run["train_accuracy"] > 0.5
        assert run["global_step"] < 50  # full batch: one step per epoch
        assert run["global_step"] == run["epoch"] + 1
        assert results["summary"][name]["steps"]["values"] == [run["global_step"]]


def test_demo_standard_model(tmp_path, capsys):
    assert main(["demo", "--model", "standard", "--width", "32", "--max-train-samples", "256", "--max-test-samples",
                 "120", "--seeds", "1", "--epochs", "3", "--quiet", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["config"]["model"], results["config"]["lr"], results["config"]["sigma"]) == ("standard", 0.2, 0.01)
    assert list(results["heavytail"]["runs"][0]["epsilon_point"]["ratios"]) == ["hidden1.weight"]
    assert results["heavytail"]["runs"][0]["global_step"] == 3


def test_demo_png_and_tensorboard_events(tiny_run):
    _, out, _, _ = tiny_run
    png = (out / "pruning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    for name in ("vanilla", "heavytail"):
        for seed in (0, 1):
            events = list((out / name / "version_0" / f"seed_{seed}").glob("events.out.tfevents.*"))
            assert events
            acc = EventAccumulator(str(events[0]))
            acc.Reload()
            tags = acc.Tags()["scalars"]
            assert "pruning/neuron/accuracy@0.50" in tags
            assert "train_full/accuracy" in tags  # the stopping rule's metric
    heavy = EventAccumulator(str(next((out / "heavytail" / "version_0" / "seed_0").glob("events.out.tfevents.*"))))
    heavy.Reload()
    assert any("noise" in tag for tag in heavy.Tags()["scalars"])


def test_demo_is_deterministic(tiny_run, tmp_path, capsys):
    _, out, _, _ = tiny_run
    assert main(["demo", *TINY, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert (tmp_path / "results.json").read_text() == (out / "results.json").read_text()


def test_demo_other_seed_differs(tiny_run, tmp_path, capsys):
    _, out, _, _ = tiny_run
    assert main(["demo", *TINY, "--seed", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    a = json.loads((out / "results.json").read_text())
    b = json.loads((tmp_path / "results.json").read_text())
    # seeds 1, 2 against 0, 1: the shared seed 1 gives the same run, the other differs
    assert a["heavytail"]["runs"][1]["compressibility"] == b["heavytail"]["runs"][0]["compressibility"]
    assert a["heavytail"]["runs"][0]["compressibility"] != b["heavytail"]["runs"][1]["compressibility"]


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--alpha", "3", ["--alpha", "(0, 2]", "'3'"]),
        ("--alpha", "abc", ["--alpha", "'abc'"]),
        ("--sigma", "-1", ["--sigma", "> 0", "'-1'"]),
        ("--structure", "gaussian", ["--structure", "'gaussian'", "'neuron'", "'iid'"]),
        ("--dataset", "imagenet", ["--dataset", "'imagenet'", "'digits'"]),
        ("--width", "0", ["--width", ">= 1", "'0'"]),
        ("--epochs", "1.5", ["--epochs", "'1.5'"]),
        ("--lr", "nan", ["--lr", "'nan'"]),
        ("--devices", "zero", ["--devices", "'zero'"]),
        ("--strategy", "fsdp", ["--strategy", "'fsdp'", "'ddp_spawn'"]),
        ("--accelerator", "tpu9", ["--accelerator", "'tpu9'", "'cpu'"]),
        ("--model", "resnet", ["--model", "'resnet'", "'meanfield'", "'standard'"]),
        ("--seeds", "0", ["--seeds", ">= 1", "'0'"]),
        ("--stop-at", "1.5", ["--stop-at", "(0, 1]", "'1.5'"]),
        ("--check-every", "0", ["--check-every", ">= 1", "'0'"]),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flag, value, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["demo", flag, value, "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


def test_an_overflowing_noise_scale_exits_2_before_training(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:  # 1e6 * 10**(1/0.1) = 1e16, above the 1e15 bound
        main(["demo", "--alpha", "0.1", "--lr", "10", "--sigma", "1e6", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--sigma/--lr/--alpha" in err and "at most 1e+15" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["a file", "inside a file", "/proc"])
def test_an_out_that_cannot_be_written_is_one_clean_error_before_training(where, capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    out = {"a file": afile, "inside a file": afile / "runs", "/proc": "/proc/lightning-heavytail-test/runs"}[where]
    with pytest.raises(SystemExit) as info:
        main(["demo", "--quiet", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse's usage, then one line: the message
    assert last.startswith("lightning-heavytail demo: error: argument --out: cannot write the outputs to"
                           f" {str(out)!r}: ")
    assert "Traceback" not in err
    if where != "/proc":
        assert f"{str(afile)!r} exists and is not a directory" in err
    assert not os.path.exists("/proc/lightning-heavytail-test")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and afile.read_text() == ""


def test_missing_data_dir_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--dataset", "mnist", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "--data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["demo", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "nowhere" in err
    with pytest.raises(SystemExit) as info:  # a directory without the files
        main(["demo", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "data_batch_1" in capsys.readouterr().err


def test_lightning_refusing_hardware_flags_exits_2_and_leaves_no_directory(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--accelerator", "cuda", "--out", str(tmp_path / "new" / "runs")])
    assert info.value.code == 2
    assert "--accelerator" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # --out was created for the check, and removed when the command was refused


def test_subcommand_required_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out
    args = build_parser().parse_args(["demo"])
    assert (args.dataset, args.structure, args.out) == ("digits", "neuron", "runs")
    assert (args.model, args.width, args.alpha, args.seeds, args.stop_at, args.batch_size) == (
        "meanfield", 5000, 1.75, 3, 0.95, None)


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "lightning_heavytail", "demo", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--alpha", "--sigma", "--structure", "--data-dir", "--strategy", "--devices", "--out", "--model",
                 "--seeds", "--stop-at"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_demo_ddp_spawn_two_processes(tmp_path, capfd):
    code = main(["demo", *TINY[:-2], "--seeds", "1", "--accelerator", "cpu", "--devices", "2",
                 "--strategy", "ddp_spawn", "--out", str(tmp_path)])
    assert code == 0
    printed = capfd.readouterr().out
    # only rank 0 prints the tables
    assert printed.count("test accuracy under neuron pruning") == 1
    assert printed.count("more compressible") == 1
    results = json.loads((tmp_path / "results.json").read_text())
    cfg = results["config"]
    assert (cfg["devices"], cfg["device_ids"], cfg["world_size"], cfg["accelerator"], cfg["strategy"]) == (
        2, [0, 1], 2, "cpu", "ddp_spawn")
    assert cfg["requested"] == {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}
    for name in ("vanilla", "heavytail"):
        assert len(results[name]["accuracy"]) == len(DEMO_SPARSITIES)
        # 256 samples, batch 64 per rank, 2 ranks: 2 steps per epoch
        assert results[name]["runs"][0]["global_step"] == 4
        assert 0.0 <= results["summary"][name]["epsilon_ratio"]["mean"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heavytail", "pruning_curves.png", "results.json", "vanilla"]


def test_results_json_stores_what_ran_and_the_command_that_repeats_it(tiny_run):
    import lightning
    import torch

    from lightning_heavytail.cli import DemoConfig

    _, out, _, _ = tiny_run
    cfg = json.loads((out / "results.json").read_text())["config"]
    # resolved by Lightning, not the flags: an int count, the accelerator and strategy that ran
    assert cfg["devices"] == 1 and isinstance(cfg["devices"], int) and cfg["device_ids"] == [0]
    assert (cfg["accelerator"], cfg["strategy"], cfg["world_size"], cfg["num_nodes"]) == ("cpu", "single_device", 1, 1)
    assert cfg["requested"] == {"accelerator": "auto", "devices": 1, "strategy": "auto"}
    # the data as used: 256 training samples in batches of 64, 120 test samples
    assert cfg["data"] == {"train_samples": 256, "test_samples": 120, "batch_size": 64, "in_features": 64,
                           "num_classes": 10}
    assert cfg["versions"]["torch"] == torch.__version__ and cfg["versions"]["lightning"] == lightning.__version__
    # the stored command parses back to the same settings
    args = shlex.split(cfg["command"])
    assert args[:2] == ["lightning-heavytail", "demo"]
    again = DemoConfig.from_namespace(build_parser().parse_args(args[1:]))
    expected = DemoConfig(width=32, epochs=2, batch_size=64, seeds=2, max_train_samples=256, max_test_samples=120)
    assert again.public() == expected.public()
    assert {key: cfg[key] for key in expected.public() if key not in ("accelerator", "devices", "strategy")} == {
        key: value for key, value in expected.public().items() if key not in ("accelerator", "devices", "strategy")}


def test_the_two_runs_write_different_hparams_and_the_noise_settings_are_the_callbacks(tiny_run):
    import yaml

    from lightning_heavytail import HeavyTailNoiseCallback

    _, out, _, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    for seed_index, seed in enumerate((0, 1)):
        read = {name: yaml.safe_load((out / results[name]["runs"][seed_index]["log_dir"] / "hparams.yaml").read_text())
                for name in ("vanilla", "heavytail")}
        vanilla, heavy = read["vanilla"], read["heavytail"]
        assert vanilla != heavy
        assert (vanilla["demo/run"], heavy["demo/run"]) == ("vanilla", "heavytail")
        assert vanilla["demo/seed"] == heavy["demo/seed"] == seed
        # the vanilla run states that it has no noise, and carries none of the callback's other settings
        assert vanilla["demo/noise"] == "none (plain SGD)" and vanilla["heavytail/sigma"] == 0.0
        assert [key for key in vanilla if key.startswith("heavytail/")] == ["heavytail/sigma"]
        # the heavy-tailed run's noise settings are exactly HeavyTailNoiseCallback.hparams() (seed resolved)
        callback = HeavyTailNoiseCallback(alpha=1.75, sigma=0.1, structure="neuron", params="paper", seed=seed)
        assert {key: heavy[key] for key in heavy if key.startswith("heavytail/")} == callback.hparams()
        # both keep the module's hyperparameters
        assert vanilla["lr"] == heavy["lr"] == 0.5 and vanilla["val_name"] == "train_full"


def test_progress_on_stderr_by_default_and_off_with_quiet(tiny_run, tmp_path, capsys):
    _, _, printed, quiet_errors = tiny_run
    assert quiet_errors == ""  # --quiet: nothing on stderr
    assert "the paper's measurement" in printed
    assert main(["demo", "--width", "32", "--max-train-samples", "256", "--max-test-samples", "120", "--seeds", "1",
                 "--epochs", "2", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    lines = [line.strip() for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[0].startswith("digits: 256 training and 120 test samples; 2 runs (vanilla, heavytail x 1 seed(s))")
    results = json.loads((tmp_path / "results.json").read_text())
    for index, name in enumerate(("vanilla", "heavytail"), start=1):
        label = f"[{index}/2] {name}, seed 0: "
        shown = [line for line in lines if line.startswith(label)]
        # every epoch, with the training accuracy the stopping rule checks
        assert any("epoch 1, step 1, training accuracy" in line for line in shown)
        assert any("epoch 2, step 2, training accuracy" in line and "(stops above 0.95)" in line for line in shown)
        # the pruning evaluation as it happens: announced, then what it found
        evaluating = next(i for i, line in enumerate(shown) if "pruning: evaluating neuron and global" in line)
        found = next(line for line in shown[evaluating:] if "pruning: accuracy AUC" in line)
        # and batch by batch while it runs (each batch loaded once, every level of both methods run on it)
        assert any(re.search(r"pruning: neuron/global x \d+ levels \+ epsilon point: batch (\d+)/\1\b", line)
                   for line in shown[evaluating:shown.index(found)])
        run = results[name]["runs"][0]
        assert f"epsilon ratio {run['epsilon_point']['ratio']:.4f}" in found
        assert f"accuracy AUC {run['auc']:.4f}" in found
        done = next(line for line in lines if line.startswith(f"{name}, seed 0: 2 steps, test accuracy"))
        assert f"accuracy at the epsilon point {run['epsilon_point']['metrics']['accuracy']:.4f}" in done
    assert "Traceback" not in captured.err and "GPU available" not in captured.err
    assert "the paper's measurement" in captured.out and "the paper's measurement" not in captured.err


def test_the_demo_hides_the_known_lightning_warnings_and_a_plain_fit_shows_them(tmp_path):
    import warnings

    import lightning.pytorch as pl

    from tests.helpers import MLP

    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path).fit(MLP())
    assert any("LeafSpec" in str(w.message) for w in plain)  # so the check below can fail
    with warnings.catch_warnings(record=True) as demo:
        warnings.simplefilter("always")
        assert main(["demo", "--width", "16", "--max-train-samples", "64", "--max-test-samples", "50", "--seeds", "1",
                     "--epochs", "1", "--quiet", "--out", str(tmp_path / "demo")]) == 0
    messages = [str(w.message) for w in demo]
    assert not any("LeafSpec" in m or "does not have many workers" in m for m in messages), messages


def test_the_figure_spreads_the_high_sparsities_and_its_markers_do_not_overlap(tiny_run):
    import math

    from lightning_heavytail._demo_report import plot
    from lightning_heavytail._plotting import SPARSITY_TICKS, sparsity_axis

    _, out, _, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    figure = plot(results)
    figure.canvas.draw()
    for ax in figure.axes:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["0", "0.5", "0.8", "0.9", "0.95", "0.98", "0.99"]
        assert list(ax.get_xticks()) == pytest.approx([-math.log10(1 - float(s)) for s in labels])
        assert [float(s) for s in labels] == list(SPARSITY_TICKS[:len(labels)])
        # 0.9 -> 0.99 gets as much room as 0 -> 0.9
        assert sparsity_axis(0.99) - sparsity_axis(0.9) == pytest.approx(sparsity_axis(0.9) - sparsity_axis(0.0))
        curves = {line.get_label(): line for line in ax.get_lines()}
        van, ht = curves["vanilla"], curves["heavytail"]
        assert list(van.get_xdata()) == pytest.approx([sparsity_axis(s) for s in (
            results["vanilla"]["sparsity"] if ax is figure.axes[0] else results["vanilla"]["global"]["sparsity"])])
        # markers of the two runs at the same level: centres at least one marker apart on the screen
        diameter = van.get_markersize() * figure.dpi / 72
        a = van.get_transform().transform(van.get_xydata())
        b = ht.get_transform().transform(ht.get_xydata())
        assert min(float(np.hypot(*(p - q))) for p, q in zip(a, b, strict=True)) >= diameter
    # the epsilon point of each run is marked on the neuron panel, where its ratio is
    marks = {line.get_label(): line for line in figure.axes[0].get_lines() if "epsilon point" in line.get_label()}
    assert len(marks) == 2
    for name in ("vanilla", "heavytail"):
        ratio = results["summary"][name]["epsilon_ratio"]["mean"]
        mark = marks[f"{name}, epsilon point ({ratio:.2f} pruned)"]
        assert mark.get_xdata()[0] == pytest.approx(sparsity_axis(ratio))
        assert mark.get_ydata()[0] == pytest.approx(results["summary"][name]["epsilon_accuracy"]["mean"])


def test_a_hill_estimate_above_2_is_printed_as_such_and_explained(tiny_run):
    from lightning_heavytail._demo_report import TAIL_INDEX_NOTE, tail_index

    _, out, printed, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    row = next(line for line in printed.splitlines() if "alpha per unit (Hill)" in line)
    cells = [cell.strip() for cell in row.split("|")[1:]]
    for name, cell in zip(("vanilla", "heavytail"), cells, strict=True):
        value = results[name]["compressibility"]["alpha_hill_units"]
        assert cell == tail_index(value)
        assert cell.startswith("> 2 (") == (value > 2)  # never a bare number above 2
    assert TAIL_INDEX_NOTE in printed
    assert tail_index(44.25) == "> 2 (44.25)" and tail_index(1.5) == "1.5000" and tail_index(2.0) == "2.0000"


@pytest.mark.parametrize("argv", [["demo", "--help"], ["demo", "--alpha", "3"], ["demo", "--structure", "x"],
                                  ["demo", "--dataset", "mnist"], ["demo", "--out", "/proc/lightning-heavytail/x"]])
def test_help_and_bad_flags_import_neither_torch_nor_lightning(argv):
    code = (
        "import json, sys\n"
        "from lightning_heavytail.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    status = exit.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'numpy', 'matplotlib'))\n"
        "print(json.dumps({'status': status, 'heavy': heavy}))\n"
    )
    report, proc = run_in_fresh_python(code)
    assert report["status"] == (0 if "--help" in argv else 2)
    assert report["heavy"] == []
    if "--help" not in argv:
        flag = {"--dataset": "--data-dir"}.get(argv[1], argv[1])  # --dataset mnist: --data-dir is missing
        assert f"argument {flag}" in proc.stderr
