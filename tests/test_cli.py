import json
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_heavytail.cli import DEMO_SPARSITIES, build_parser, main

TINY = ["--epochs", "2", "--width", "32", "--max-train-samples", "256", "--max-test-samples", "120",
        "--batch-size", "64"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", *TINY, "--out", str(out)])
    return code, out, buffer.getvalue()


def test_demo_writes_results_consistent_with_history(tiny_run):
    code, out, _ = tiny_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {"config", "vanilla", "heavytail"} <= set(results)
    cfg = results["config"]
    assert (cfg["width"], cfg["epochs"], cfg["dataset"], cfg["structure"]) == (32, 2, "digits", "neuron")
    assert cfg["noise_scale"] == pytest.approx(cfg["sigma"] * cfg["lr"] ** (1 / cfg["alpha"]))
    for name in ("vanilla", "heavytail"):
        run = results[name]
        history = json.loads((out / run["log_dir"] / "prune_eval.json").read_text())["history"]
        last = history[-1]
        assert last["epoch"] == 1 and run["epoch"] == 1
        curve = last["curves"]["neuron"]
        assert run["requested"] == list(DEMO_SPARSITIES) == curve["requested"]
        assert run["sparsity"] == curve["sparsities"]
        assert run["accuracy"] == curve["metrics"]["accuracy"]
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"])
        fp = run["compressibility"]["fraction_prunable"]
        assert fp == last["compressibility"]["fraction_prunable/total"] and 0.0 <= fp <= 1.0
        assert run["compressibility"]["epsilon"] == 0.1
        # measured neuron sparsity of a 32-unit layer: round(s * 32) / 32 units zeroed
        assert run["sparsity"][1] == pytest.approx(16 / 32)
    assert results["vanilla"]["noise"] is None
    assert results["heavytail"]["noise"]["alpha"] == cfg["alpha"]
    # the noise changed the weights, so the two runs differ
    assert results["vanilla"]["compressibility"] != results["heavytail"]["compressibility"]


def test_demo_prints_table_and_tensorboard_hint(tiny_run):
    _, out, printed = tiny_run
    assert "vanilla" in printed and "heavytail" in printed
    assert "fraction prunable" in printed
    assert f"tensorboard --logdir {out}" in printed
    results = json.loads((out / "results.json").read_text())
    # the printed accuracy at sparsity 0.5 is the measured one
    row = next(line for line in printed.splitlines() if line.strip().startswith("0.50 |"))
    assert f"{results['vanilla']['accuracy'][1]:.4f}" in row and f"{results['heavytail']['accuracy'][1]:.4f}" in row


def test_demo_png_and_tensorboard_events(tiny_run):
    _, out, _ = tiny_run
    png = (out / "pruning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    for name in ("vanilla", "heavytail"):
        events = list((out / name / "version_0").glob("events.out.tfevents.*"))
        assert events
        acc = EventAccumulator(str(events[0]))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert any(tag.startswith("pruning/") for tag in tags)
        assert "pruning/neuron/accuracy@0.50" in tags
    heavy = EventAccumulator(str(next((out / "heavytail" / "version_0").glob("events.out.tfevents.*"))))
    heavy.Reload()
    assert any("noise" in tag for tag in heavy.Tags()["scalars"])


def test_demo_is_deterministic(tiny_run, tmp_path, capsys):
    _, out, _ = tiny_run
    assert main(["demo", *TINY, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert (tmp_path / "results.json").read_text() == (out / "results.json").read_text()


def test_demo_other_seed_differs(tiny_run, tmp_path, capsys):
    _, out, _ = tiny_run
    assert main(["demo", *TINY, "--seed", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    a = json.loads((out / "results.json").read_text())
    b = json.loads((tmp_path / "results.json").read_text())
    assert a["heavytail"]["compressibility"] != b["heavytail"]["compressibility"]


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


def test_an_overflowing_noise_scale_and_an_out_that_is_a_file_exit_2_before_training(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:  # 1e6 * 10**(1/0.1) = 1e16, above the 1e15 bound
        main(["demo", "--alpha", "0.1", "--lr", "10", "--sigma", "1e6", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--sigma/--lr/--alpha" in err and "at most 1e+15" in err and "Traceback" not in err
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit) as info:
        main(["demo", "--out", str(afile / "runs")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and "is not a directory" in err
    assert not list(tmp_path.glob("**/results.json"))


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


def test_lightning_refusing_hardware_flags_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--accelerator", "cuda", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "--accelerator" in capsys.readouterr().err


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


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "lightning_heavytail", "demo", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--alpha", "--sigma", "--structure", "--data-dir", "--strategy", "--devices", "--out"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_demo_ddp_spawn_two_processes(tmp_path, capfd):
    code = main(["demo", *TINY, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp_spawn",
                 "--out", str(tmp_path)])
    assert code == 0
    printed = capfd.readouterr().out
    # only rank 0 prints the table
    assert printed.count("test accuracy under neuron pruning") == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["devices"] == "2" and results["config"]["strategy"] == "ddp_spawn"
    for name in ("vanilla", "heavytail"):
        assert len(results[name]["accuracy"]) == len(DEMO_SPARSITIES)
        # 256 samples, batch 64 per rank, 2 ranks: 2 steps per epoch
        assert results[name]["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heavytail", "pruning_curves.png", "results.json", "vanilla"]
