"""The package's top level: lazy public names (PEP 562) and the names defined once in ``_names``."""

import importlib

import pytest

import lightning_heavytail
from lightning_heavytail import _names
from tests.helpers import run_in_fresh_python

PUBLIC = [
    "PRUNING_METHODS", "EpsilonPoint", "HeavyTailNoiseCallback", "PruneEvalCallback", "PruningCurve",
    "add_heavy_tailed_noise", "best_k_relative_error", "compressibility_report", "derive_seed", "draw_noise",
    "evaluate_at_epsilon", "evaluate_at_ratios", "evaluate_pruning_curve", "fraction_prunable", "hill_alpha",
    "mohammadi_alpha", "noise_scale", "sample_positive_stable", "sample_stable", "select_parameters",
]


def test_import_loads_neither_torch_nor_lightning_until_a_name_is_used():
    code = (
        "import json, sys\n"
        "import lightning_heavytail, lightning_heavytail.cli\n"
        "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'numpy'})\n"
        "before = heavy()\n"
        "names = dir(lightning_heavytail)\n"
        "after_dir = heavy()\n"
        "lightning_heavytail.sample_stable\n"
        "print(json.dumps({'before': before, 'after_dir': after_dir, 'after_use': heavy(), 'dir': names}))\n"
    )
    report, _ = run_in_fresh_python(code)
    assert report["before"] == [] and report["after_dir"] == []
    assert report["after_use"] == ["numpy", "torch"]  # the sampler needs torch, not Lightning
    assert set(PUBLIC) <= set(report["dir"])


def test_the_public_names_are_the_same_and_resolve_to_their_modules_objects():
    assert sorted(lightning_heavytail.__all__) == sorted(PUBLIC)
    assert set(lightning_heavytail._HOME) == set(PUBLIC)
    for name in PUBLIC:
        value = getattr(lightning_heavytail, name)
        home = importlib.import_module(lightning_heavytail._HOME[name])
        assert value is getattr(home, name), name
    namespace: dict[str, object] = {}
    exec("from lightning_heavytail import *", namespace)
    assert set(PUBLIC) <= set(namespace)
    assert set(PUBLIC) <= set(dir(lightning_heavytail)) and "__version__" in dir(lightning_heavytail)


def test_submodules_as_attributes_and_unknown_names():
    assert lightning_heavytail.stable is importlib.import_module("lightning_heavytail.stable")
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        lightning_heavytail.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from lightning_heavytail import no_such_name", {})


def test_each_name_list_is_defined_once_and_the_command_line_uses_it():
    from lightning_heavytail import data, noise
    from lightning_heavytail.callbacks import noise as noise_callback
    from lightning_heavytail.cli import build_parser

    assert noise.NOISE_STRUCTURES is _names.NOISE_STRUCTURES and noise_callback.NoiseStructure is _names.NoiseStructure
    assert data.DATASETS is _names.DATASETS
    demo = build_parser().parse_args(["demo"]).demo_parser
    choices = {action.dest: action.choices for action in demo._actions if action.choices is not None}
    assert choices["structure"] is _names.NOISE_STRUCTURES and choices["dataset"] is _names.DATASETS
    for name in _names.FILE_DATASETS:  # the datasets read from --data-dir really need it
        with pytest.raises(FileNotFoundError, match="data-dir"):
            data.load_dataset(name, None)
