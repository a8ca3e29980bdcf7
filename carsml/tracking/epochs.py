"""Per-epoch metrics of a fit, handed to MLflow as the engine reports them (an engine callback)."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient

from carsml.engine.callbacks import Callback

# The per-epoch test curves (reported, never selected on) get their own keys so that `test_acc` / `test_loss` hold one
# value each: the evaluation of the selected (best-validation) model.
EPOCH_KEYS = {"test_loss": "epoch_test_loss", "test_acc": "epoch_test_acc"}


def epoch_key(key: str) -> str:
    """The MLflow key of an engine history key."""
    return EPOCH_KEYS.get(key, key)


class MlflowMetrics(Callback):
    """Hands per-epoch metrics to one MLflow run (step = epoch); on resume, back-fills any epoch the run lacks and
    skips any epoch the run already holds (a checkpoint older than the run's last logged epoch), so every step is
    logged exactly once."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.client = MlflowClient()
        self.logged: set[int] = set()  # epochs the run held when it was resumed

    def on_resume(self, history: list[dict]) -> None:
        self.logged = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}
        for record in history:
            epoch = int(record["epoch"])
            for key, value in record.items():
                if key == "epoch":
                    continue
                steps = {m.step for m in self.client.get_metric_history(self.run_id, epoch_key(key))}
                if epoch not in steps:
                    self.client.log_metric(self.run_id, epoch_key(key), float(value), step=epoch)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch in self.logged:
            return
        mlflow.log_metrics({epoch_key(k): float(v) for k, v in metrics.items() if k != "epoch"}, step=epoch,
                           run_id=self.run_id)
