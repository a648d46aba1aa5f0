"""PruneEvalCallback's progress while it evaluates: Lightning's TQDM bar, a progress bar of one's own, none."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from lightning_heavytail.callbacks._eval_progress import CountedBatches
from lightning_heavytail.callbacks.prune_eval import PruneEvalCallback
from tests.callbacks.test_prune_eval import TinyNet, loader, trainer_kwargs


def test_counted_batches_tick_as_each_batch_is_done_and_restart_with_each_iteration() -> None:
    ticks: list[int] = []
    counted = CountedBatches(["a", "b", "c"], ticks.append)
    seen = []
    for batch in counted:
        seen.append((batch, list(ticks)))
    # a batch counts as done when the next one is asked for; the last when the iteration ends
    assert seen == [("a", [0]), ("b", [0, 1]), ("c", [0, 1, 2])] and ticks == [0, 1, 2, 3]
    ticks.clear()
    assert list(counted) == ["a", "b", "c"] and ticks == [0, 1, 2, 3]  # re-iterable, counted from zero again


class RecordingBar(ProgressBar):
    """A progress bar of one's own that takes PruneEvalCallback's progress through ``pruning_progress``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int | None]] = []
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def pruning_progress(self, description: str, done: int, total: int | None) -> None:
        self.calls.append((description, done, total))


def test_a_progress_bar_with_pruning_progress_is_told_each_batch_of_each_evaluation(tmp_path: Path) -> None:
    bar = RecordingBar()
    callback = PruneEvalCallback(sparsities=(0.0, 0.5, 0.9), method=("global", "neuron"), dataloader=loader(40, 0))
    kwargs: dict[str, Any] = {**trainer_kwargs(tmp_path, max_epochs=2), "enable_progress_bar": True}
    Trainer(**kwargs, callbacks=[bar, callback]).fit(TinyNet(), loader(32, 1))

    assert {description for description, _, _ in bar.calls} == {
        "pruning: global/neuron x 3 levels + epsilon point"}
    assert {total for _, _, total in bar.calls} == {5}  # 40 samples in batches of 8
    done = [count for _, count, _ in bar.calls]
    # each evaluation counts 0..5 (every batch loaded once, all levels run on it); two epochs, two evaluations
    assert done == [0, 1, 2, 3, 4, 5] * 2
    assert len(callback.records) == 2


def test_lightnings_tqdm_bar_shows_the_evaluation_with_its_batch_count(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(24, 0), epsilon_point=False)
    kwargs: dict[str, Any] = {**trainer_kwargs(tmp_path), "enable_progress_bar": True}
    # Lightning's default without rich (with rich installed, RichProgressBar is: see the next test)
    Trainer(**kwargs, callbacks=[TQDMProgressBar(), callback]).fit(TinyNet(), loader(32, 1))

    out = capsys.readouterr().out
    # the bar tqdm draws for the evaluation: its description and the 3 batches done of 3
    assert re.search(r"pruning: global x 2 levels: 100%\|[^\r\n]*\| 3/3", out), out[-2000:]


def test_without_a_progress_bar_nothing_is_shown_and_the_evaluation_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(24, 0))
    Trainer(**trainer_kwargs(tmp_path), callbacks=[callback]).fit(TinyNet(), loader(32, 1))
    assert len(callback.records) == 1
    assert "pruning:" not in capsys.readouterr().out


def test_richs_progress_bar_shows_the_evaluation_as_a_task_of_its_own(tmp_path: Path) -> None:
    import io

    from lightning.pytorch.callbacks import RichProgressBar

    screen = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": screen, "force_terminal": True, "width": 200})
    callback = PruneEvalCallback(sparsities=(0.0, 0.5), dataloader=loader(24, 0), epsilon_point=False)
    kwargs: dict[str, Any] = {**trainer_kwargs(tmp_path), "enable_progress_bar": True}
    Trainer(**kwargs, callbacks=[bar, callback]).fit(TinyNet(), loader(32, 1))

    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # without the terminal's escape codes
    assert re.search(r"pruning: global x 2 levels\s+━+\s+3/3", drawn), drawn[-1500:]
    assert bar.progress is None or all("pruning:" not in task.description for task in bar.progress.tasks)

