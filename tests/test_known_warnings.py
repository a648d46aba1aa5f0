import os
import subprocess
import sys
import warnings

from lightning_heavytail.known_warnings import KNOWN_WARNINGS, ignore_known_warnings, pythonwarnings


def test_only_the_known_warnings_are_hidden_here_and_in_child_processes_then_all_is_restored(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "default::ResourceWarning")
    filters = list(warnings.filters)
    script = (
        "import warnings\n"
        + "".join(f"warnings.warn({message + ' (and more)'!r}, FutureWarning)\n" for message in KNOWN_WARNINGS)
        + "warnings.warn('a warning of your own', UserWarning)\n"
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with ignore_known_warnings():
            for message in KNOWN_WARNINGS:
                warnings.warn(message + " (and more)", FutureWarning, stacklevel=1)
            warnings.warn("a warning of your own", UserWarning, stacklevel=1)
            assert os.environ["PYTHONWARNINGS"] == pythonwarnings("default::ResourceWarning")
            child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        # outside the block, the same warnings show again
        warnings.warn(KNOWN_WARNINGS[0] + " (and more)", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a warning of your own", KNOWN_WARNINGS[0] + " (and more)"]
    assert "a warning of your own" in child.stderr
    assert not any(message in child.stderr for message in KNOWN_WARNINGS), child.stderr
    assert os.environ["PYTHONWARNINGS"] == "default::ResourceWarning"
    assert warnings.filters == filters
    # without the variable, PYTHONWARNINGS is removed again
    monkeypatch.delenv("PYTHONWARNINGS")
    with ignore_known_warnings():
        pass
    assert "PYTHONWARNINGS" not in os.environ


def test_importing_the_package_installs_no_warning_filter():
    code = (
        "import warnings\n"
        "import lightning.pytorch, torch\n"
        "before = list(warnings.filters)\n"
        "import lightning_heavytail, lightning_heavytail.cli, lightning_heavytail.demo\n"
        "import lightning_heavytail.known_warnings\n"
        "from lightning_heavytail import HeavyTailNoiseCallback, PruneEvalCallback\n"
        "print(warnings.filters == before)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.stdout.strip().splitlines()[-1] == "True", proc.stderr[-2000:]


def test_every_known_message_fits_pythonwarnings():
    # PYTHONWARNINGS splits entries on commas and fields on colons: a message with either would be cut
    for message in KNOWN_WARNINGS:
        assert "," not in message and ":" not in message
