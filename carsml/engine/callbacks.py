"""The engine reports through callbacks (the MLflow tracking layer, progress bars and optuna pruning plug in
here), so the engine itself never imports a tracking library.

Epochs are numbered from 1. Per epoch `fit` computes the metrics, writes the checkpoint (which already holds
this epoch), then calls `on_epoch_end` — so a callback that raises (e.g. `optuna.TrialPruned`) stops the fit
with the epoch safely recorded, and the exception reaches the caller unchanged.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from carsml.progress import job_plan

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from carsml.engine.types import FitResult, FitState


class Callback:
    """Hooks called by `fit`; every method is a no-op by default. Exceptions raised by a hook propagate."""

    def on_fit_start(self, state: FitState) -> None:
        """Before the first epoch (after the model, optimizer and any checkpoint are set up)."""

    def on_resume(self, history: list[dict[str, float]]) -> None:
        """When resuming: the epochs already done, read from the checkpoint (each dict has an "epoch" key), so
        a tracker can back-fill any epoch it has not logged and log every epoch exactly once."""

    def on_batch_end(
        self, epoch: int, step: int, num_steps: int, loss: float, images_per_second: float
    ) -> None:
        """Every `TrainConfig.log_every_steps` training steps and after the last one (1-based `step`); `loss`
        is the mean training loss over the steps since the previous call."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """After epoch `epoch` (1-based) is evaluated and checkpointed. Keys: train_loss train_acc val_loss
        val_acc [test_loss test_acc] lr [lr_head] epoch_seconds images_per_second."""

    def on_fit_end(self, result: FitResult) -> None:
        """After the last epoch (or early stop); the model already holds the best weights."""

    def on_fit_error(self, error: BaseException) -> None:
        """When the fit is ending with an exception (from training or from a callback), before it propagates;
        e.g. close progress bars or mark a tracked run as failed. Must not raise."""


class CallbackList:
    """Dispatch each hook to several callbacks in order."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("on_"):
            raise AttributeError(name)

        def call(*args: Any) -> None:
            for cb in self.callbacks:
                getattr(cb, name)(*args)

        return call

    def fit_error(self, error: BaseException) -> None:
        """Call `on_fit_error` on every callback; a failing handler only warns, so the original error wins."""
        for cb in self.callbacks:
            try:
                cb.on_fit_error(error)
            except Exception as handler_error:  # the fit's own error must propagate, not this one
                warnings.warn(
                    f"{type(cb).__name__}.on_fit_error raised {handler_error!r} while handling {error!r}",
                    RuntimeWarning,
                    stacklevel=2,
                )


def format_epoch(epoch: int, total: int, metrics: dict[str, float]) -> str:
    """One-line summary of an epoch's metrics."""
    parts = [
        f"epoch {epoch}/{total}",
        f"train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.4f}",
    ]
    if "val_acc" in metrics:
        parts.append(f"val loss {metrics['val_loss']:.4f} acc {metrics['val_acc']:.4f}")
    if "test_acc" in metrics:
        parts.append(f"test loss {metrics['test_loss']:.4f} acc {metrics['test_acc']:.4f}")
    parts.append(f"lr {metrics['lr']:.3g}")
    parts.append(f"{metrics['epoch_seconds']:.1f}s {metrics['images_per_second']:.0f} img/s")
    return " | ".join(parts)


LONG_JOB_SECONDS = 15 * 60  # a job estimated to take longer than this on a CPU says so after its first epoch
QUICK_FLAGS = "--image-size 64 --epochs 15 --batch-size 32 --head-widths 512,256 --lr 0.001"  # the README's demo


class RichProgress(Callback):
    """One progress bar over the whole job (every epoch of every planned fit: `carsml.progress.planned_fits`) with an
    ETA, on a terminal, and one summary line per epoch. After the job's first epoch, a job estimated to take longer
    than LONG_JOB_SECONDS on a CPU says so and names the README's quick demo flags.

    When the output is not a terminal (CI logs, files) only the lines are printed.
    """

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console(file=sys.stdout)
        self.total_epochs = 0
        self.steps = 1
        self.device_type = "cpu"
        self._epochs_seen = 0

    @property
    def interactive(self) -> bool:
        return bool(self.console.is_terminal)

    def on_fit_start(self, state: FitState) -> None:
        self.total_epochs, self.steps = state.cfg.epochs, max(1, state.steps_per_epoch)
        self.device_type = state.device.type
        if state.resumed:
            self.console.print(f"resuming at epoch {state.start_epoch}/{state.cfg.epochs}")

    def _bar(self) -> tuple[Progress, TaskID]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        plan = job_plan()
        if plan.progress is None or plan.progress.console is not self.console:
            plan.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True)
            plan.progress.start()
            plan.progress.add_task("train", total=plan.fits * self.total_epochs * self.steps, loss=float("nan"),
                                   ips=0.0)
        return plan.progress, plan.progress.task_ids[0]

    def _stop_bar(self) -> None:
        plan = job_plan()
        if plan.progress is not None and (plan.done >= plan.fits or plan.fits == 1):
            plan.progress.stop()
            plan.progress = None

    def on_batch_end(
        self, epoch: int, step: int, num_steps: int, loss: float, images_per_second: float
    ) -> None:
        if not self.interactive:
            return
        plan = job_plan()
        progress, task = self._bar()
        unit = f"{plan.unit} {plan.done + 1}/{plan.fits} · " if plan.fits > 1 else ""
        progress.update(task, completed=(plan.done * self.total_epochs + epoch - 1) * self.steps + step,
                        description=f"{unit}epoch {epoch}/{self.total_epochs}", loss=loss, ips=images_per_second,
                        refresh=True)  # every log_every_steps steps: cheap, and no step is skipped by the timer

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.console.print(format_epoch(epoch, self.total_epochs, metrics), highlight=False, soft_wrap=True)
        self._epochs_seen += 1
        plan = job_plan()
        if self._epochs_seen == 1 and plan.done == 0 and self.device_type == "cpu":
            left = metrics["epoch_seconds"] * (plan.fits * self.total_epochs - epoch)
            if left > LONG_JOB_SECONDS:
                self.console.print(
                    f"note: at {metrics['epoch_seconds']:.0f} s per epoch this job needs about {left / 60:.0f} more "
                    f"minutes on this CPU ({plan.fits} x {self.total_epochs} epochs). For a quick look, the README's "
                    f"demo flags: {QUICK_FLAGS}", highlight=False, soft_wrap=True)

    def on_fit_end(self, result: FitResult) -> None:
        plan = job_plan()
        if plan.fits > 1:  # without a plan every fit is a job of its own
            plan.done += 1
        self._stop_bar()
        stop = " (stopped early)" if result.stopped_early else ""
        chosen = (f"best epoch {result.best_epoch}: val acc {result.best_val_acc:.4f} loss {result.best_val_loss:.4f}"
                  if math.isfinite(result.best_val_acc) else f"no validation set: the last epoch ({result.best_epoch})")
        self.console.print(chosen + stop, highlight=False, soft_wrap=True)

    def on_fit_error(self, error: BaseException) -> None:
        plan = job_plan()
        if plan.progress is not None:
            plan.progress.stop()
            plan.progress = None
