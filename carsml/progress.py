"""Progress on the terminal: transient bars for long loops outside training (decoding the cache, generating data), and
the plan of a training job — how many fits it runs (folds, models, trials) — so that one bar with one ETA covers the
whole job and a job that will take long on this device says so after its first epoch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

_console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """Yield an `update(done, total)` callback that drives a transient bar (silent when stderr is not a terminal)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=_console, transient=True, disable=not _console.is_terminal) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@dataclass
class JobPlan:
    """The trainings (fits) of the current job: how many are planned, how many ended, what one is called."""

    fits: int = 1
    done: int = 0
    unit: str = "fit"  # fold | model | trial
    progress: Progress | None = None  # the job's one bar, kept across its fits


_plan = JobPlan()


def job_plan() -> JobPlan:
    """The plan of the job in progress (one fit unless an entry point announced more with `planned_fits`)."""
    return _plan


@contextlib.contextmanager
def planned_fits(fits: int, unit: str) -> Iterator[JobPlan]:
    """Announce that the block runs `fits` trainings (k folds, N models, N trials) so progress and ETA span them all."""
    global _plan
    previous, _plan = _plan, JobPlan(fits=max(1, fits), unit=unit)
    try:
        yield _plan
    finally:
        if _plan.progress is not None:
            _plan.progress.stop()
        _plan = previous
