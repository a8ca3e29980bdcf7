"""transfer / transfer_all end to end: a timm model through a real `mlflow run`, offline pretrained weights failing
fast, a local weights file loaded with a new head, bad input before any run, and transfer_all's parent + nested
children + comparison table (with resume).

The four study architectures cost about a minute of CPU at 32 px even for one epoch (vgg16 alone has 134M
parameters), so transfer_all is exercised with two small timm models; a separate test pins the default list to the
study's four."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from carsml.cli import app, run_experiment
from carsml.config import load_config
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments.common import build_model
from carsml.experiments.transfer import STUDY_MODELS, parse_models
from carsml.models.factory import resolve_data_config
from carsml.tracking.epochs import epoch_key
from carsml.tracking.models import load_model
from tests.conftest import REPO, TINY, use_module_store

ENGINE_EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
                     "images_per_second")
# tiny and fast: 4 synthetic classes at 32 px, float32 on the CPU
SMALL = {k: TINY[k] for k in ("synth_classes", "synth_images_per_class", "image_size", "batch_size", "device")} | {
    "pretrained": False, "amp": "off", "epochs": 1}
SMALL_MODELS = "efficientnet_b0,resnet18"


@pytest.fixture(scope="module")
def store(module_store: str) -> str:
    return module_store


@pytest.fixture(autouse=True)
def experiment(isolated: Path, store: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """This test's own experiment in the module's store."""
    return use_module_store(store, monkeypatch, request, "t-")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network and an empty Hugging Face cache, whatever the machine running the tests has."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def mlflow_run(entry: str, params: dict[str, object], cwd: Path, experiment: str) -> subprocess.CompletedProcess:
    """`mlflow run` of this repo with the venv's bin first on PATH (so `carsml` resolves) and the test's store."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
            "--experiment-name", experiment]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _runs(experiment: str) -> list[mlflow.entities.Run]:
    exp = mlflow.get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id]) if exp else []


def _steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def test_study_defaults() -> None:
    cfg = load_config("transfer")
    assert (cfg["model"], cfg["image_size"], cfg["batch_size"], cfg["epochs"]) == ("resnet50", 224, 128, 10)
    assert (cfg["lr"], cfg["optimizer"], cfg["pretrained"], cfg["weights"]) == (1e-4, "adam", True, None)
    assert parse_models(load_config("transfer_all")["models"]) == list(STUDY_MODELS)
    assert list(STUDY_MODELS) == ["resnet50", "vgg16", "densenet121", "efficientnet_b0"]
    assert all(timm.is_model(name) for name in STUDY_MODELS)


def test_mlflow_run_transfer_logs_what_the_cnn_experiments_log(isolated: Path, experiment: str) -> None:
    # the model is logged by the shared fit_and_log like any other (see the weights test); skipped here for time
    done = mlflow_run("transfer", {**SMALL, "model": "resnet50", "pretrained": "false", "epochs": 2,
                                   "log_model": "false"}, isolated, experiment)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = _runs(experiment)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "transfer-resnet50"
    assert run.data.tags["carsml.entry_point"] == "transfer" and run.data.tags["carsml.model"] == "resnet50"
    assert run.data.tags["carsml.init"] == "random"
    for key in ENGINE_EPOCH_KEYS:
        assert _steps(run_id, epoch_key(key)) == [1, 2], key
    m = run.data.metrics
    assert {"best_val_acc", "best_val_loss", "test_acc", "test_loss", "test_top5", "test_macro_f1", "n_params",
            "train_seconds"} <= set(m)
    assert m["n_params"] > 23e6  # resnet50's backbone with a 4-way head
    assert m["test_correct"] + m["test_errors"] > 0
    arts = {a.path for folder in ("figures", "tables") for a in MlflowClient().list_artifacts(run_id, folder)}
    assert {"figures/curves.png", "figures/confusion_matrix_test.png", "tables/history.csv"} <= arts


def test_pretrained_offline_fails_fast_through_mlflow_run(isolated: Path, offline: None, experiment: str) -> None:
    done = mlflow_run("transfer", {**SMALL, "model": "resnet50", "pretrained": "true"}, isolated, experiment)
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert "pretrained weights for 'resnet50'" in message and "weights=<file>" in message, done.stderr[-2000:]
    (run,) = _runs(experiment)  # the run mlflow created is ended FAILED, with nothing trained
    assert run.info.status == "FAILED" and not run.data.metrics


def test_pretrained_offline_fails_before_a_run_exists(offline: None, experiment: str) -> None:
    with pytest.raises(CarsmlError, match="(?s)HF_HUB_OFFLINE is set.*pass weights=<file>") as err:
        run_experiment("transfer", {**SMALL, "model": "resnet50", "pretrained": True, "experiment_name": experiment})
    assert "docs/transfer.md" in str(err.value)
    assert _runs(experiment) == []


def test_weights_file_loads_the_backbone_replaces_the_head_and_trains(tmp_path: Path, experiment: str,
                                                                      offline: None) -> None:
    source = timm.create_model("resnet18", num_classes=1000)  # stands in for downloaded ImageNet weights
    file = tmp_path / "resnet18_in1k.pth"
    torch.save(source.state_dict(), file)
    # pretrained keeps its default (true): the local file takes precedence, so offline this is the one option to add
    cfg = {**SMALL, "pretrained": True, "model": "resnet18", "weights": str(file), "freeze_backbone_epochs": 1,
           "experiment_name": experiment, "keep_checkpoints": True}
    run_experiment("transfer", cfg)
    (run,) = _runs(experiment)
    assert run.info.status == "FINISHED" and run.data.tags["carsml.init"] == f"weights:{file}"
    assert _steps(run.info.run_id, "train_loss") == [1]
    model, info = load_model(run.info.run_id)
    # normalisation follows the model's timm data config (ImageNet statistics), not our CNNs' 0.5
    assert tuple(info["mean"]) == resolve_data_config("resnet18")["mean"] != (0.5, 0.5, 0.5)
    wanted = source.state_dict()
    backbone = {name: p for name, p in model.named_parameters() if not name.startswith("fc.")}
    assert backbone and all(torch.equal(p, wanted[name]) for name, p in backbone.items())  # loaded, then frozen
    assert tuple(model.fc.weight.shape) == (TINY["synth_classes"], 512)  # the 1000-way head was replaced
    fresh = build_model(load_config("transfer", cfg), TINY["synth_classes"])  # the same seeded starting point
    assert torch.equal(fresh.conv1.weight, wanted["conv1.weight"])
    assert not torch.equal(fresh.fc.weight, model.fc.weight)  # the new head trained
    # resuming restores every tensor from the run's checkpoint: the weights file is no longer needed
    file.unlink()
    run_experiment("transfer", {"resume_run_id": run.info.run_id})
    (resumed,) = _runs(experiment)
    assert resumed.info.status == "FINISHED" and _steps(run.info.run_id, "train_loss") == [1]


@pytest.mark.parametrize("entry, overrides, fragment", [
    ("transfer", {"model": "resnet5O"}, "model 'resnet5O': unknown.*did you mean resnet50"),
    ("transfer", {"model": "resnet34", "weights": "WEIGHTS"}, "does not fit model 'resnet34'.*missing: layer1.2"),
    ("transfer", {"lr": 0.0}, "TrainConfig.lr: expected a positive number"),
    ("transfer_all", {"model": "resnet50"}, "transfer_all trains every name in `models`"),
    ("transfer_all", {"models": "resnet18,resnet18"}, "resnet18 listed more than once"),
    ("transfer_all", {"models": "resnet18,vgg1600"}, "model 'vgg1600': unknown"),
    ("transfer_all", {"weights": "FOLDER"}, "no file for model 'resnet18' in .*resnet18.pth"),
])
def test_bad_input_is_one_clear_error_before_any_run(entry: str, overrides: dict, fragment: str,
                                                    tmp_path: Path, experiment: str) -> None:
    file = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), file)
    (tmp_path / "folder").mkdir()
    values = {"WEIGHTS": str(file), "FOLDER": str(tmp_path / "folder")}
    overrides = {k: values.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    base = {**SMALL, "experiment_name": experiment}
    base |= {"model": "resnet18"} if entry == "transfer" else {"models": "resnet18"}
    with pytest.raises(ConfigError, match=fragment):
        run_experiment(entry, {**base, **overrides})
    assert _runs(experiment) == []


@pytest.fixture(scope="module")
def transfer_all_parent(store: str, cache_dir: Path) -> str:
    """One transfer_all parent of two small timm models in experiment "transfer-all", trained once for the tests
    below; returns its run id."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARSML_CACHE", str(cache_dir))
        mp.setenv("MLFLOW_TRACKING_URI", store)
        run_experiment("transfer_all", {**SMALL, "models": SMALL_MODELS, "log_model": False,
                                        "experiment_name": "transfer-all"})
    (parent,) = [r for r in _runs("transfer-all") if r.data.tags["carsml.entry_point"] == "transfer_all"]
    return parent.info.run_id


def _children(parent: str) -> list[mlflow.entities.Run]:
    return [r for r in _runs("transfer-all") if r.data.tags.get("mlflow.parentRunId") == parent]


def test_transfer_all_nests_one_transfer_run_per_model_and_logs_the_table(transfer_all_parent: str,
                                                                           tmp_path: Path) -> None:
    parent = transfer_all_parent
    assert mlflow.get_run(parent).info.status == "FINISHED"
    children = _children(parent)
    assert sorted(c.data.tags["carsml.model"] for c in children) == sorted(SMALL_MODELS.split(","))
    for child in children:  # each child is a full transfer run
        assert child.info.status == "FINISHED" and child.data.tags["carsml.entry_point"] == "transfer"
        assert child.data.params["model"] == child.data.tags["carsml.model"]
        assert _steps(child.info.run_id, "val_acc") == [1]
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=parent, artifact_path="tables/transfer_comparison.csv"))
    assert list(logged["model"]) == SMALL_MODELS.split(",")  # the parent's `models` order
    by_run = {c.info.run_id: c.data.metrics for c in children}
    for row in logged.itertuples(index=False):  # read from the children's MLflow metrics, not re-evaluated
        assert (row.val_acc, row.test_acc, row.correct) == (by_run[row.run_id]["best_val_acc"],
                                                            by_run[row.run_id]["test_acc"],
                                                            by_run[row.run_id]["test_correct"])
    assert "figures/transfer_comparison.png" in {a.path for a in MlflowClient().list_artifacts(parent, "figures")}
    # `carsml compare` rebuilds the same table from MLflow
    result = CliRunner().invoke(app, ["compare", "--parent-run-id", parent, "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "transfer_comparison.md").read_text() == mlflow.artifacts.load_text(
        f"runs:/{parent}/tables/transfer_comparison.md")


def test_transfer_all_resume_retrains_only_unfinished_models(transfer_all_parent: str) -> None:
    parent = transfer_all_parent
    kept, crashed = sorted(_children(parent), key=lambda c: c.data.tags["carsml.model"] != "efficientnet_b0")
    MlflowClient().set_terminated(crashed.info.run_id, "FAILED")  # as if the machine died during this model
    # a fresh process, as after a crash: the original options come from the parent, the children follow it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["carsml", "transfer-all", "--resume-run-id", parent], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    children = _children(parent)
    assert len(children) == 3 and mlflow.get_run(parent).info.status == "FINISHED"
    retrained = [c for c in children if c.info.run_id not in (kept.info.run_id, crashed.info.run_id)]
    assert [c.data.tags["carsml.model"] for c in retrained] == [crashed.data.tags["carsml.model"]]
    assert retrained[0].data.params["epochs"] == "1"  # the parent's original options, not the defaults
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=parent, artifact_path="tables/transfer_comparison.csv"))
    assert set(logged["run_id"]) == {kept.info.run_id, retrained[0].info.run_id}
