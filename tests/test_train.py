"""Training entry points end to end: baseline / improved single runs, k-fold parent + children, bad input before any
run exists, and resume after SIGKILL continuing the same MLflow run with every epoch step exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from carsml.cli import run_experiment
from carsml.errors import CarsmlError, ConfigError
from tests.conftest import TINY, TRAINED_RUN, VARIANT, kill_when

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_test_loss", "epoch_test_acc", "lr",
                 "epoch_seconds", "images_per_second")
FINALS = ("best_val_acc", "test_acc", "test_top5", "test_macro_f1", "n_params", "train_seconds")


def _runs() -> list[mlflow.entities.Run]:
    exp = mlflow.get_experiment_by_name("stanford-cars")
    return MlflowClient().search_runs([exp.experiment_id]) if exp else []


def _steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


@pytest.mark.parametrize("entry", ["baseline", "improved"])
def test_single_run_logs_epochs_finals_figures_and_model(entry: str) -> None:
    trained = run_experiment(entry, TINY)
    (run,) = _runs()
    assert run.info.status == "FINISHED" and run.info.run_name == f"{entry}-{entry}_cnn"
    for key in EPOCH_METRICS:
        assert _steps(run.info.run_id, key) == [1, 2], key
    assert set(FINALS) <= set(run.data.metrics)
    assert run.data.metrics["test_correct"] + run.data.metrics["test_errors"] == len(trained.test.labels)
    arts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "figures")}
    assert {"figures/curves.png", "figures/confusion_matrix_test.png"} <= arts
    split = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                            artifact_path="data/split_membership.csv"))
    assert set(split["role"]) == {"train", "val"}  # the test split is never part of selection
    tags = run.data.tags
    assert tags["carsml.entry_point"] == entry and tags["carsml.data_layout"] == "devkit"
    assert tags["carsml.git_commit"] and tags["carsml.model_uri"].startswith("models:/")
    assert run.data.params["seed"] == "42" and run.data.params["model"] in ("baseline_cnn", "improved_cnn")
    # the logged model is loadable by run id and predicts with the trained weights
    from carsml.tracking.models import load_model

    model, info = load_model(run.info.run_id)
    assert len(info["class_names"]) == TINY["synth_classes"] and model.training is False
    assert info["model_config"]["name"] == run.data.params["model"]


def test_kfold_parent_and_children() -> None:
    table = run_experiment("kfold_improved", {**TINY, "folds": 3})
    runs = _runs()
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3 and len(table) == 3
    parent = parents[0]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert _steps(child.info.run_id, "val_acc") == [1, 2]
    assert sorted(int(c.data.tags["carsml.fold"]) for c in children) == [0, 1, 2]
    m = parent.data.metrics
    accs = [c.data.metrics["test_acc"] for c in children]
    assert m["cv_test_acc_mean"] == pytest.approx(sum(accs) / 3)
    assert m["cv_test_acc_std"] == pytest.approx(pd.Series(accs).std(ddof=0))
    assert _steps(parent.info.run_id, "mean_val_acc") == [1, 2]
    arts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/mean_curves.png", "figures/confusion_matrix_test.png"} <= arts
    folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                            artifact_path="data/fold_membership.csv"))
    assert folds["fname"].is_unique  # each training image is held out exactly once


@pytest.mark.parametrize("overrides, fragment", [
    ({"model": "resnet_5O"}, "resnet_5O"),
    ({"optimizer": "adamax"}, "adamax"),
    ({"scheduler": "step"}, "step"),
    ({"augmentation": "heavy"}, "heavy"),
    ({"lr": -1.0}, "lr"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"image_size": 16}, "image_size"),
])
def test_bad_training_options_fail_before_a_run_exists(overrides: dict, fragment: str) -> None:
    with pytest.raises(CarsmlError, match=fragment):
        run_experiment("improved", {**TINY, **overrides})
    assert _runs() == []


@pytest.mark.parametrize("folds, fragment", [(1, "at least 2"), (99, "smallest class")])
def test_bad_k_fails_before_a_run_exists(folds: int, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        run_experiment("kfold_baseline", {**TINY, "folds": folds})
    assert _runs() == []


def test_resume_of_unknown_run_or_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CarsmlError, match="no such MLflow run"):
        run_experiment("improved", {**TINY, "resume_run_id": "0123456789abcdef"})
    run_experiment("improved", {**TINY, "epochs": 1, "log_model": False})
    (run,) = _runs()
    ckpt = Path(run.data.tags["carsml.checkpoint_dir"]) / "last.pt"
    assert not ckpt.parent.exists()  # a finished run's checkpoints are removed unless keep_checkpoints
    with pytest.raises(CarsmlError, match="no checkpoint"):
        run_experiment("improved", {**TINY, "resume_run_id": run.info.run_id})
    with pytest.raises(ConfigError, match="is a 'improved' run, not 'baseline'"):
        run_experiment("baseline", {**TINY, "resume_run_id": run.info.run_id})


def test_sigkill_then_resume_continues_the_same_run(isolated: Path) -> None:
    # The kill is sent as soon as the third epoch is logged; nine more epochs (each a noticeable fraction of a second
    # at 48 px) leave room for the poll's latency on a fast machine, and the deadline is only a ceiling for a stuck
    # process (a slow or loaded machine just takes longer), so neither machine speed nor load decides the verdict.
    epochs = 12
    options = {**TRAINED_RUN, "image_size": 48, "epochs": epochs, "device": "cpu", "log_model": False,
               **({"amp": VARIANT["amp"]} if "amp" in VARIANT else {})}
    cli = [sys.executable, "-m", "carsml.cli", "improved",
           *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in options.items()), [])]
    proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})

    def third_epoch_logged() -> str | None:
        runs = _runs()
        return runs[0].info.run_id if runs and len(_steps(runs[0].info.run_id, "val_acc")) >= 3 else None

    run_id = kill_when(proc, third_epoch_logged)
    assert run_id, "training finished or timed out before it could be killed mid-way"
    killed = MlflowClient().get_run(run_id)
    assert killed.info.status == "RUNNING"
    done_before = len(_steps(run_id, "val_acc"))
    assert done_before < epochs

    run_experiment("improved", {"resume_run_id": run_id})  # the original config comes from the run itself
    runs = _runs()
    assert [r.info.run_id for r in runs] == [run_id]  # one run
    resumed = runs[0]
    assert resumed.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert _steps(run_id, key) == list(range(1, epochs + 1)), key  # every epoch step exactly once
    assert "test_acc" in resumed.data.metrics


@pytest.mark.parametrize("on", [True, False])
def test_training_runs_log_system_metrics_unless_switched_off(on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    run_experiment("baseline", {**TINY, "epochs": 3, "log_model": False, "system_metrics": on})
    (run,) = _runs()
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert run.data.params["system_metrics"] == str(on).lower()  # as `mlflow run -P` logs it
    if on:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    else:
        assert not system
