"""features_rf end to end on a tiny fine-tuned resnet50 (32 px, CPU): features extracted once and stored with the
run, RandomForest / logistic / kNN metrics, the network-vs-forest error overlap, both logged models loadable
(rf_head with mlflow.sklearn, rf_model as an image→label pyfunc), the promote engineer's contract, and bad sources
rejected before any run. The tests share one tracking store (creating one takes seconds), each in its own experiment.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.ensemble import RandomForestClassifier
from timm.models.resnet import ResNet
from torch import nn

from carsml.cli import run_experiment
from carsml.config import load_config
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments import features_rf
from carsml.experiments.common import resolve_dataset
from carsml.experiments.features_rf import Features, best_transfer_run, check_backbone
from carsml.experiments.train import decode
from carsml.tracking.models import SIGNATURE, download_bundle, encode_image
from tests.conftest import use_module_store

SOURCE_EXPERIMENT = "features"
# 5 synthetic classes x 20 images at 32 px; two epochs of resnet50 in float32 on the CPU
SOURCE = {"synth_classes": 5, "synth_images_per_class": 20, "image_size": 32, "epochs": 2, "batch_size": 16,
          "lr": 1e-3, "device": "cpu", "amp": "off", "pretrained": False, "experiment_name": SOURCE_EXPERIMENT}
FAST = {"device": "cpu", "n_jobs": 1, "n_estimators": 30}


@pytest.fixture(scope="module")
def store(module_store: str) -> str:
    return module_store


@pytest.fixture(autouse=True)
def experiment(isolated: Path, store: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """This test's own experiment in the module's store."""
    return use_module_store(store, monkeypatch, request, "f-")


@pytest.fixture(scope="module")
def source_run(store: str, cache_dir: Path) -> str:
    """A finished resnet50 `transfer` run in experiment "features" (trained once); returns its run id."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARSML_CACHE", str(cache_dir))
        mp.setenv("MLFLOW_TRACKING_URI", store)
        run_experiment("transfer", SOURCE)
    return mlflow.last_active_run().info.run_id


def _runs(experiment: str, entry_point: str = "features_rf") -> list[mlflow.entities.Run]:
    exp = mlflow.get_experiment_by_name(experiment)
    query = f"tags.`carsml.entry_point` = '{entry_point}'"
    return MlflowClient().search_runs([exp.experiment_id], query) if exp else []


def _fake_run(experiment: str, tags: dict[str, str], val_acc: float = 0.5, status: str = "FINISHED") -> str:
    """A run carrying only tags and metrics (for the selection rules and bad sources)."""
    mlflow.set_experiment(experiment)
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_metrics({"best_val_acc": val_acc, "best_val_loss": 1.0})
    if status != "FINISHED":
        MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


def _load(run_id: str, split: str) -> Features:
    return Features.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"features/{split}.npz"))


def test_features_rf_from_the_best_resnet50_transfer_run(source_run: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # count what the backbone sees during extraction (the logged pyfunc's own checks run it too, outside)
    extracting, calls, images = [False], [], []
    original_extract, original_forward = features_rf.extract_features, ResNet.forward_features

    def extract(model: nn.Module, data, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(len(data))
        extracting[0] = True
        try:
            return original_extract(model, data, *args, **kwargs)
        finally:
            extracting[0] = False

    def forward_features(self: ResNet, x: torch.Tensor) -> torch.Tensor:
        if extracting[0]:
            images.append(x.shape[0])
        return original_forward(self, x)

    monkeypatch.setattr(features_rf, "extract_features", extract)
    monkeypatch.setattr(ResNet, "forward_features", forward_features)
    result = run_experiment("features_rf", {**FAST, "experiment_name": SOURCE_EXPERIMENT})  # default: best transfer
    run = mlflow.get_run(result.run_id)
    source = mlflow.get_run(source_run)
    assert run.info.status == "FINISHED" and result.backbone_run_id == source_run

    # the contract the promote entry point relies on
    tags, m = run.data.tags, run.data.metrics
    assert (tags["carsml.entry_point"], tags["carsml.backbone_run_id"], tags["carsml.model"]) == (
        "features_rf", source_run, "resnet50")
    assert tags["carsml.rf_head_uri"] == result.rf_head_uri and tags["carsml.rf_model_uri"] == result.rf_model_uri
    for head in ("rf", "logreg", "knn"):
        for split in ("val", "test"):
            for metric in ("acc", "macro_precision", "macro_recall", "macro_f1", "weighted_precision",
                           "weighted_recall", "weighted_f1"):
                assert 0.0 <= m[f"{head}_{split}_{metric}"] <= 1.0

    # features: one backbone pass over the official train split (train + val) and one over test, stored
    train, val, test = (_load(run.info.run_id, s) for s in ("train", "val", "test"))
    n_official_train = len(train.labels) + len(val.labels)
    assert calls == [n_official_train, len(test.labels)] and sum(images) == n_official_train + len(test.labels)
    assert train.features.shape == (len(train.labels), 2048) and train.features.dtype == np.float32
    split = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=source_run,
                                                            artifact_path="data/split_membership.csv"))
    assert sorted(val.fname) == sorted(split.loc[split["role"] == "val", "fname"])  # the source run's own split
    # the network's logits from the same pass reproduce its logged test accuracy
    assert m["net_test_acc"] == pytest.approx(source.data.metrics["test_acc"], abs=1.5 / len(test.labels))

    # heads refit from the stored features alone reproduce the logged numbers
    refit = RandomForestClassifier(n_estimators=FAST["n_estimators"], random_state=42, n_jobs=1)
    refit.fit(train.features, train.labels)
    assert np.mean(refit.predict(test.features) == test.labels) == m["rf_test_acc"]
    rf_preds = refit.predict(test.features)
    net_wrong, rf_wrong = test.logits.argmax(1) != test.labels, rf_preds != test.labels
    assert m["rf_net_test_both_wrong"] == (net_wrong & rf_wrong).sum()
    assert m["rf_net_test_only_net_wrong"] == (net_wrong & ~rf_wrong).sum()
    assert m["rf_net_test_only_rf_wrong"] == (~net_wrong & rf_wrong).sum()
    report = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/reports/rf_test_classification_report.txt")
    assert "macro avg" in report and "weighted avg" in report

    # rf_head: features in, class out
    rf_head = mlflow.sklearn.load_model(tags["carsml.rf_head_uri"])
    assert np.array_equal(rf_head.predict(test.features), rf_preds)

    # rf_model: base64 images in, the same outputs as every carsml model; labels from the forest's votes
    data_cfg = load_config("transfer", SOURCE)
    test_images = decode(data_cfg, resolve_dataset(data_cfg), "test").images
    rf_model = mlflow.pyfunc.load_model(tags["carsml.rf_model_uri"])
    assert rf_model.metadata.signature == SIGNATURE
    out = rf_model.predict(pd.DataFrame({"image": [encode_image(img, "PNG") for img in test_images]}))
    assert list(out.columns) == ["label", "class_id", "score", "top5_labels", "top5_scores"]
    votes = rf_head.predict_proba(test.features)
    assert np.allclose(out["score"], votes.max(axis=1))  # PNG is lossless: the same features, the same votes
    assert np.allclose(votes[np.arange(len(out)), out["class_id"]], votes.max(axis=1))
    class_names = json.loads((download_bundle(source_run) / "model.json").read_text())["class_names"]
    assert list(out["label"]) == [class_names[i] for i in out["class_id"]]


def test_default_source_is_the_best_transfer_run_of_the_model_by_validation_accuracy(experiment: str) -> None:
    _fake_run(experiment, {"carsml.entry_point": "transfer", "carsml.model": "resnet50"}, val_acc=0.5)
    best = _fake_run(experiment, {"carsml.entry_point": "transfer", "carsml.model": "resnet50"}, val_acc=0.7)
    _fake_run(experiment, {"carsml.entry_point": "transfer", "carsml.model": "resnet50"}, val_acc=0.9,
              status="FAILED")
    _fake_run(experiment, {"carsml.entry_point": "transfer", "carsml.model": "vgg16"}, val_acc=0.95)
    _fake_run(experiment, {"carsml.entry_point": "transfer_all", "carsml.model": "resnet50"}, val_acc=0.99)
    assert best_transfer_run(experiment, "resnet50").info.run_id == best
    # under `mlflow run` the launched run's experiment is searched (--experiment-name decides), not the option's
    launched = mlflow.get_experiment_by_name(experiment).experiment_id
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_RUN_ID", "0" * 32)
        mp.setenv("MLFLOW_EXPERIMENT_ID", launched)
        assert best_transfer_run("stanford-cars", "resnet50").info.run_id == best


@pytest.mark.parametrize("case, fragment", [
    ("empty experiment", "no finished transfer run with carsml.model='resnet50' in experiment"),
    ("data_analysis run", "holds no carsml model"),
    ("unknown run id", "no such MLflow run"),
    ("k-fold child", "a k-fold child"),
])
def test_bad_source_is_one_clear_error_before_any_run(case: str, fragment: str, experiment: str) -> None:
    cfg = {**FAST, "experiment_name": experiment}
    mlflow.set_experiment(experiment)
    if case == "data_analysis run":
        cfg["run_id"] = _fake_run(experiment, {"carsml.entry_point": "data_analysis"})
    elif case == "unknown run id":
        cfg["run_id"] = "0" * 32
    elif case == "k-fold child":
        cfg["run_id"] = _fake_run(experiment, {"carsml.entry_point": "kfold_improved", "carsml.fold": "0"})
    with pytest.raises(CarsmlError, match=fragment):
        run_experiment("features_rf", cfg)
    assert _runs(experiment) == []


class _NoHead(nn.Module):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x  # still a feature map, not one vector per image


@pytest.mark.parametrize("overrides, fragment", [
    ({"n_estimators": 0}, "n_estimators: expected a positive integer"),
    ({"knn_k": 0}, "knn_k: expected a positive integer"),
    ({"amp": "fp8"}, "'amp': expected one of"),
    ({"n_jobs": 0}, "n_jobs: expected a positive number of jobs or -1"),
])
def test_bad_options_fail_before_looking_for_a_source(overrides: dict, fragment: str, experiment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        run_experiment("features_rf", {**FAST, **overrides, "experiment_name": experiment})
    assert _runs(experiment) == []


def test_check_backbone_needs_forward_head_returning_one_vector_per_image() -> None:
    with pytest.raises(CarsmlError, match="has no forward_features"):
        check_backbone(nn.Sequential(nn.Flatten(), nn.LazyLinear(3)), 32, "run x")
    with pytest.raises(CarsmlError, match=r"are \(2, 3, 32, 32\), expected \(images, features\)"):
        check_backbone(_NoHead(), 32, "run x")
