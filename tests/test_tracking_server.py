"""Every flow through a real `mlflow server` (SQL backend, proxied artifacts, 127.0.0.1), as a team runs carsml:
training, k-fold, features_rf, tuning with nested trials, promote into the server's registry, and
`mlflow models serve` pulling the champion from the server. Nothing is written to a local store.

One server and one set of runs per module (the colour dataset learns in one epoch); the server is stopped afterwards.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from carsml.cli import run_experiment
from carsml.errors import CarsmlError
from tests.conftest import REPO, kill_when, mlflow_server
from tests.test_promote import COLOURS, NET, RF, build_store, tracking_env
from tests.test_serving import Server, frame

TINY_KFOLD = {"image_size": 32, "head_widths": "32", "epochs": 1, "batch_size": 8, "device": "cpu", "folds": 2}
TINY_TUNE = {"image_size": 32, "head_widths": "32", "epochs": 1, "batch_size": 8, "device": "cpu", "n_trials": 2,
             "pruner": "none", "study_name": "server-flow"}


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[dict[str, Any]]:
    """A server, and through it: a good resnet50 transfer run + its features_rf run, a k-fold, a tuning study and
    a promotion. Yields the run ids, the server URL and its folder."""
    folder = tmp_path_factory.mktemp("server")
    with mlflow_server(folder) as url:
        store = build_store(folder, cache_dir, weak_run=False, uri=url)
        with tracking_env(url, folder, cache_dir):
            store["kfold"] = run_experiment("kfold_baseline", {**TINY_KFOLD, "data": str(store["data"])})
            store["kfold_id"] = mlflow.last_active_run().info.run_id
            store["tune"] = run_experiment("tune", {**TINY_TUNE, "data": str(store["data"]),
                                                    "storage": f"sqlite:///{folder}/optuna.db"})
            store["promotion"] = run_experiment("promote", {})
        yield {**store, "url": url}


def test_runs_and_their_artifacts_live_on_the_server_only(flow: dict[str, Any]) -> None:
    client = MlflowClient(flow["url"])
    good = client.get_run(flow["good"])
    assert good.info.status == "FINISHED" and good.info.artifact_uri.startswith("mlflow-artifacts:")
    tables = {a.path for a in client.list_artifacts(flow["good"], "tables")}
    assert "tables/history.csv" in tables  # the run's files went through the server's artifact proxy
    local = Path(client.download_artifacts(flow["good"], "tables/history.csv", str(flow["folder"] / "dl")))
    assert local.read_text().startswith("epoch")  # and come back from it
    served_files = list((flow["folder"] / "artifacts").rglob("*"))
    assert any(p.name == "MLmodel" for p in served_files)  # the logged models are in the server's artifact store
    assert not (flow["folder"] / "mlruns").exists() and not (flow["folder"] / "mlflow.db").exists()
    rf = client.get_run(flow["rf"])
    assert rf.info.status == "FINISHED" and rf.data.tags["carsml.source_run_id"] == flow["good"]


def test_kfold_parent_and_fold_children_through_the_server(flow: dict[str, Any]) -> None:
    client = MlflowClient(flow["url"])
    parent = client.get_run(flow["kfold_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert {c.info.status for c in children} == {"FINISHED"}
    assert "cv_test_acc_mean" in parent.data.metrics


def test_tuning_trials_are_nested_runs_on_the_server(flow: dict[str, Any]) -> None:
    client = MlflowClient(flow["url"])
    parent = client.get_run(flow["tune"].parent_run_id)
    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(trials) == 2
    assert {t.info.status for t in trials} <= {"FINISHED", "KILLED"}


def test_promote_registers_on_the_server_and_again_changes_nothing(flow: dict[str, Any], cache_dir: Path) -> None:
    client = MlflowClient(flow["url"])
    net = client.get_model_version_by_alias(NET, "champion")
    assert net.run_id == flow["good"] and client.get_model_version_by_alias(RF, "champion").version == "1"
    with tracking_env(flow["url"], flow["folder"], cache_dir):
        again = run_experiment("promote", {})
    assert not again.created and not again.rf_created and not again.champion.moved
    assert [v.version for v in client.search_model_versions(f"name = '{NET}'")] == ["1"]


def test_mlflow_models_serve_pulls_the_champion_from_the_server(flow: dict[str, Any]) -> None:
    server = Server(f"models:/{NET}@champion", flow["url"], flow["folder"] / "serve.log")
    try:
        server.wait_ready()
        images = []
        for colour in COLOURS:
            buf = io.BytesIO()
            Image.fromarray(np.full((40, 40, 3), colour, dtype=np.uint8)).save(buf, format="PNG")
            images.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        response = server.post(frame(images))
        assert response.status_code == 200, response.text
        labels = [row["label"] for row in response.json()["predictions"]]
        assert labels == [f"colour_{i}" for i in range(len(COLOURS))]
    finally:
        server.stop()
    assert os.path.getsize(flow["folder"] / "serve.log") > 0


def test_a_run_killed_on_one_machine_resumes_on_another_through_the_server(
        flow: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL after the third epoch, then resume with another cache folder (another machine: the killed one's
    checkpoint folder is gone): the checkpoints come from the run's artifacts on the server, the same run finishes
    with every epoch logged once, and its checkpoint artifacts are deleted."""
    epochs = 10
    options = {"image_size": 32, "head_widths": "32", "epochs": epochs, "batch_size": 8, "device": "cpu",
               "log_model": False, "data": str(flow["data"]), "synth_classes": 4}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", flow["url"])
    monkeypatch.setenv("CARSML_CACHE", str(tmp_path / "machine-a"))
    client = MlflowClient(flow["url"])
    experiment = client.get_experiment_by_name("stanford-cars").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment])}
    cli = [sys.executable, "-m", "carsml.cli", "improved",
           *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in options.items()), [])]
    proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})

    def third_epoch_logged() -> str | None:
        new = [r for r in client.search_runs([experiment]) if r.info.run_id not in before]
        return new[0].info.run_id if new and len(client.get_metric_history(new[0].info.run_id, "val_acc")) >= 3 \
            else None

    run_id = kill_when(proc, third_epoch_logged)
    assert run_id, "training finished or timed out before it could be killed mid-way"
    assert {Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints")} >= {"last.pt", "best.pt"}
    shutil.rmtree(tmp_path / "machine-a")  # machine A is gone with its cache

    monkeypatch.setenv("CARSML_CACHE", str(tmp_path / "machine-b"))
    monkeypatch.chdir(tmp_path)
    run_experiment("improved", {"resume_run_id": run_id, "cache_dir": str(tmp_path / "machine-b")})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_acc", "lr"):
        assert [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)] == \
            list(range(1, epochs + 1)), key
    assert run.data.tags["carsml.checkpoint_dir"].startswith(str(tmp_path / "machine-b"))
    assert client.list_artifacts(run_id, "checkpoints") == []  # a finished run keeps only its results


def test_a_resume_through_a_server_that_does_not_proxy_artifacts_says_so_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mlflow server --no-serve-artifacts`: the run's checkpoints are in a folder of the server's machine; resumed on
    a machine that cannot see that folder, the error names it and the server option, and nothing trains."""
    (tmp_path / "server").mkdir()
    with mlflow_server(tmp_path / "server", proxy=False) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        options = {"image_size": 32, "head_widths": "32", "epochs": 1, "batch_size": 8, "device": "cpu",
                   "log_model": False, "synth_classes": 4, "synth_images_per_class": 12, "data": "synthetic",
                   "cache_dir": str(tmp_path / "machine-a"), "keep_checkpoints": True, "system_metrics": False}
        run_experiment("improved", options)
        run_id = mlflow.last_active_run().info.run_id
        shutil.rmtree(tmp_path / "machine-a")  # machine A is gone with its cache...
        (tmp_path / "server" / "artifacts").rename(tmp_path / "elsewhere")  # ...and this one cannot see the server's
        with pytest.raises(CarsmlError, match=r"does not proxy artifacts\. Start the server with `--artifacts-dest"):
            run_experiment("improved", {"resume_run_id": run_id, "cache_dir": str(tmp_path / "machine-b")})
        run = MlflowClient(url).get_run(run_id)
        assert run.info.status == "FINISHED" and len(MlflowClient(url).get_metric_history(run_id, "val_acc")) == 1


def test_the_champion_is_a_logged_model_whose_metrics_name_their_dataset(flow: dict[str, Any]) -> None:
    """MLflow 3's model-centred view: the selected model's validation / test metrics are logged against its
    LoggedModel and the run's dataset inputs; promote ranked LoggedModels by validation accuracy; the registered
    version is that LoggedModel."""
    client = MlflowClient(flow["url"])
    version = client.get_model_version_by_alias(NET, "champion")
    good = client.get_run(flow["good"])
    model_id = good.data.tags["carsml.model_uri"].removeprefix("models:/")
    assert version.source == f"models:/{model_id}"  # the version is that LoggedModel (the UI links the two)
    logged = client.get_logged_model(model_id)
    assert (logged.tags["carsml.model"], logged.tags["carsml.entry_point"]) == ("resnet50", "transfer")
    by_key = {m.key: m for m in logged.metrics}
    assert by_key["best_val_acc"].value == good.data.metrics["best_val_acc"]
    assert by_key["best_val_acc"].dataset_name == "stanford-cars-train"  # validation: held out of the train split
    assert by_key["test_acc"].dataset_name == "stanford-cars-test"
    assert len(client.get_metric_history(flow["good"], "test_acc")) == 1  # logged once, for the run and the model


def test_the_ui_tells_runs_apart_by_name_and_description(flow: dict[str, Any]) -> None:
    """Read back through the server's REST API, as the UI does: fold runs named by their fold first, and every
    training run described by its key result."""
    client = MlflowClient(flow["url"])
    parent = client.get_run(flow["kfold_id"])
    folds = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(f.info.run_name for f in folds) == ["fold 0 · baseline_cnn", "fold 1 · baseline_cnn"]
    assert parent.data.tags["mlflow.note.content"].startswith("2-fold CV of baseline_cnn · test acc ")
    # the UI opens the experiment on its runs table, not on MLflow 3's GenAI traces view
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    for fold in folds:  # each fold's model: its metrics tied to the fold run's own dataset inputs
        logged = client.get_logged_model(fold.data.tags["carsml.model_uri"].removeprefix("models:/"))
        assert {m.key: m.dataset_name for m in logged.metrics}["test_acc"] == "stanford-cars-test"
        assert logged.tags["carsml.fold"] == fold.data.tags["carsml.fold"]
        assert logged.name == f"baseline_cnn-fold{fold.data.tags['carsml.fold']}"  # the model list tells folds apart
        keys = [m.key for m in logged.metrics]
        assert len(keys) == len(set(keys)), "a metric logged twice against the model"
        assert "n_params" not in fold.data.params  # a metric, once
        # the parent's params in the children's form ('' for unset, true/false), so the compare view lines them up
        shared = set(parent.data.params) & set(fold.data.params)
        assert {"cache_dir", "use_boxes", "epochs"} <= shared
        assert {k: parent.data.params[k] for k in shared} == {k: fold.data.params[k] for k in shared}
    assert client.get_logged_model(client.get_run(flow["good"]).data.tags["carsml.model_uri"]
                                   .removeprefix("models:/")).name == "resnet50"
    for run in (*folds, client.get_run(flow["good"])):
        note = run.data.tags["mlflow.note.content"]
        assert f"val acc {run.data.metrics['best_val_acc']:.4f}" in note and "selected" in note
