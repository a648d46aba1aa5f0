"""What PruneEvalCallback shows while it evaluates: its batches on the trainer's progress bar, on rank zero.

An evaluation runs every level of every method on each batch, so it can take longer than the training epoch before
it; without a sign of it the run looks stuck. Lightning's default ``TQDMProgressBar`` gets a bar of its own, made the
way it makes its validation bar (it sits where that one does, and is drawn every ``refresh_rate`` batches);
``RichProgressBar`` (Lightning's default where rich is installed) a task of its own under the training bar; any other
progress bar callback that has a ``pruning_progress(description, done, total)`` method is told after each batch (the
demo's is); with ``enable_progress_bar=False``, or any other bar, nothing is shown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

Tick = Callable[[int], None]
"""Called with the number of batches this rank has evaluated so far."""


class CountedBatches:
    """``batches``, re-iterable, with ``tick(done)`` called as each batch is done (when the next one is asked for).

    Each new iteration counts from zero again; the last batch is counted when the iteration ends.
    """

    def __init__(self, batches: Iterable[Any], tick: Tick) -> None:
        self.batches = batches
        self.tick = tick

    def __iter__(self) -> Iterator[Any]:
        done = 0
        self.tick(0)
        for batch in self.batches:
            if done:
                self.tick(done)
            yield batch
            done += 1
        self.tick(done)


@contextlib.contextmanager
def evaluation_progress(trainer: Trainer, description: str, total: int | None) -> Iterator[Tick]:
    """A ``tick`` that shows ``done`` of ``total`` batches (None: unknown) on the progress bar; closed on exit.

    Only global rank zero shows anything, and only while its progress bar is enabled.
    """
    bar = trainer.progress_bar_callback
    if bar is None or not trainer.is_global_zero or not getattr(bar, "is_enabled", True):
        yield lambda done: None
        return
    if isinstance(bar, TQDMProgressBar):
        tqdm_bar = bar.init_validation_tqdm()
        tqdm_bar.set_description(description, refresh=False)
        tqdm_bar.reset(total=total)

        def tick(done: int) -> None:
            tqdm_bar.n = done  # as Lightning moves its bars: drawn every `refresh_rate` batches and at the end
            if done == total or done % max(bar.refresh_rate, 1) == 0:
                tqdm_bar.refresh()

        try:
            yield tick
        finally:
            tqdm_bar.close()
        return
    progress = getattr(bar, "progress", None)
    if isinstance(bar, RichProgressBar) and progress is not None:
        task = progress.add_task(description, total=total if total is not None else float("inf"))

        def advance(done: int) -> None:
            progress.update(task, completed=done)
            bar.refresh(hard=done == total)  # drawn by rich's refresh thread; the last state at once

        try:
            yield advance
        finally:
            progress.remove_task(task)
        return
    report = getattr(bar, "pruning_progress", None)
    if callable(report):
        yield lambda done: report(description, done, total)
        return
    yield lambda done: None
