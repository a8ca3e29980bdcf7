"""`carsml compare`: the study's transfer table read from MLflow runs (a real SQLite store, runs logged directly so
every selection rule can be exercised in milliseconds). The tests share one store (creating an SQLite store takes
seconds); each test works in its own experiment."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from carsml.cli import app
from carsml.errors import CarsmlError
from carsml.experiments.compare import build_table, to_markdown
from carsml.tracking.runs import setup_tracking

EXPERIMENT = "stanford-cars"  # set per test by the `experiment` fixture


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('compare-store')}/mlflow.db"


@pytest.fixture(autouse=True)
def experiment(isolated: Path, store: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """This test's own experiment in the module's store."""
    global EXPERIMENT
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    EXPERIMENT = "compare-" + "".join(c if c.isalnum() else "-" for c in request.node.name)
    return EXPERIMENT


def _run(entry_point: str, model: str, *, val_acc: float, val_loss: float = 1.0, test_acc: float = 0.5,
         parent: str = "", status: str = "FINISHED", params: dict | None = None) -> str:
    """Log a run with the tags and final metrics fit_and_log / transfer leave behind."""
    setup_tracking()
    mlflow.set_experiment(EXPERIMENT)
    tags = {"carsml.entry_point": entry_point, "carsml.model": model}
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_params(params or {})
        mlflow.log_metrics({"n_params": 23_528_522, "best_val_loss": val_loss, "best_val_acc": val_acc,
                            "test_loss": 0.371, "test_acc": test_acc, "test_correct": 7260, "test_errors": 781,
                            "train_seconds": 3725.4})
    if status != "FINISHED":
        MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


def _parent(models: str) -> str:
    setup_tracking()
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(tags={"carsml.entry_point": "transfer_all"}) as run:
        mlflow.log_param("models", models)
    return run.info.run_id


def test_best_run_per_model_is_chosen_by_validation_accuracy_not_test() -> None:
    best_val = _run("transfer", "resnet50", val_acc=0.80, test_acc=0.70)
    _run("transfer", "resnet50", val_acc=0.70, test_acc=0.95)  # better on test: must not win
    tie_winner = _run("transfer", "vgg16", val_acc=0.60, val_loss=0.9)
    _run("transfer", "vgg16", val_acc=0.60, val_loss=1.2)  # same val acc, higher val loss
    _run("transfer", "resnet50", val_acc=0.99, status="FAILED")  # unfinished runs never count
    _run("improved", "improved_cnn", val_acc=0.99)  # other entry points are not transfer runs
    table = build_table(EXPERIMENT)
    assert list(table["model"]) == ["resnet50", "vgg16"]  # best validation accuracy first
    assert list(table["run_id"]) == [best_val, tie_winner]
    assert table.loc[0, "test_acc"] == pytest.approx(0.70)


def test_parent_filter_keeps_its_children_in_its_models_order() -> None:
    parent = _parent("vgg16,resnet50")
    children = {m: _run("transfer", m, val_acc=acc, parent=parent) for m, acc in (("resnet50", 0.9), ("vgg16", 0.5))}
    _run("transfer", "resnet50", val_acc=0.99)  # a better run outside the parent is ignored
    table = build_table(parent_run_id=parent)
    assert list(table["model"]) == ["vgg16", "resnet50"]
    assert list(table["run_id"]) == [children["vgg16"], children["resnet50"]]


def test_markdown_has_the_study_columns_and_formats() -> None:
    _run("transfer", "resnet50", val_acc=0.8926, val_loss=0.3889, test_acc=0.9029)
    md = to_markdown(build_table(EXPERIMENT)).splitlines()
    assert md[0] == ("| model | params | val loss | val acc | test loss | test acc | correct | errors | "
                     "train time |")
    assert md[2] == "| resnet50 | 23.5M | 0.3889 | 0.8926 | 0.3710 | 0.9029 | 7260 | 781 | 1:02:05 |"


def test_cli_writes_markdown_and_csv_and_logs_them_to_the_parent(tmp_path: Path) -> None:
    parent = _parent("resnet50,densenet121")
    for model, acc in (("resnet50", 0.9), ("densenet121", 0.8)):
        _run("transfer", model, val_acc=acc, parent=parent)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "--parent-run-id", parent, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "| resnet50 | 23.5M |" in result.stdout
    csv = pd.read_csv(out / "transfer_comparison.csv")
    assert list(csv["model"]) == ["resnet50", "densenet121"] and list(csv["val_acc"]) == [0.9, 0.8]
    logged = {a.path for a in MlflowClient().list_artifacts(parent, "tables")}
    assert {"tables/transfer_comparison.md", "tables/transfer_comparison.csv"} <= logged
    md = mlflow.artifacts.load_text(f"runs:/{parent}/tables/transfer_comparison.md")
    assert md == (out / "transfer_comparison.md").read_text()


@pytest.mark.parametrize("case, fragment", [
    ("unknown experiment", "experiment 'nope': not found"),
    ("no runs", "no finished transfer runs in experiment"),
    ("parent is not transfer_all", "not a transfer_all run"),
    ("unknown parent", "no such MLflow run"),
])
def test_bad_input_is_one_clear_error(case: str, fragment: str) -> None:
    _run("improved", "improved_cnn", val_acc=0.5)  # the experiment exists but holds no transfer run
    args = {"unknown experiment": ["--experiment-name", "nope"], "no runs": [],
            "parent is not transfer_all": ["--parent-run-id", _run("improved", "x", val_acc=0.1)],
            "unknown parent": ["--parent-run-id", "0" * 32]}[case]
    result = CliRunner().invoke(app, ["compare", "--experiment-name", EXPERIMENT, *args])
    assert result.exit_code == 2
    assert fragment in " ".join(result.output.split())
    with pytest.raises(CarsmlError, match=fragment):
        build_table(*(["nope"] if case == "unknown experiment" else [EXPERIMENT]),
                    parent_run_id=args[1] if "parent" in case else "")
