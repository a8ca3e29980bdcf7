"""data_analysis end to end: real annotations reproduce the study's numbers; synthetic and real JPEGs go through the
whole path (readers, image statistics, sample grid) into one MLflow run."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from carsml.cli import run_experiment
from carsml.data.cache import build_cache
from carsml.data.readers import load_dataset
from tests.conftest import TINY


def _only_run() -> mlflow.entities.Run:
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("stanford-cars").experiment_id])
    assert len(runs) == 1
    return runs[0]


def _artifacts(run_id: str, folder: str) -> set[str]:
    return {a.path for a in MlflowClient().list_artifacts(run_id, folder)}


def test_real_annotations_reproduce_the_study_numbers(shared_data: Path) -> None:
    run_experiment("data_analysis", {"data": str(shared_data)})
    run = _only_run()
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert (m["train_images"], m["test_images"], m["n_classes"]) == (8144, 8041, 196)
    for split, mean in (("train", 41.55), ("test", 41.03)):
        assert round(m[f"{split}_class_count_mean"], 2) == mean
        assert (m[f"{split}_class_count_min"], m[f"{split}_class_count_max"]) == (24, 68)
    assert {"figures/class_distribution_train.png", "figures/class_distribution_test.png",
            "figures/box_sizes.png"} <= _artifacts(run.info.run_id, "figures")
    assert run.data.tags["carsml.data_layout"] == "annotations_only"
    assert run.data.tags["carsml.has_images"] == "false"
    assert run.data.params["data"] == str(shared_data)
    counts = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                             artifact_path="tables/class_counts.csv"))
    assert counts.loc[0, "class_name"] == "AM General Hummer SUV 2000" and counts["train"].sum() == 8144
    assert len(run.inputs.dataset_inputs) == 2  # train and test logged with mlflow.log_input


def test_synthetic_default_logs_image_statistics_and_samples() -> None:
    run_experiment("data_analysis", {k: TINY[k] for k in ("synth_classes", "synth_images_per_class")}
                   | {"sample_images": 4})
    run = _only_run()
    m = run.data.metrics
    assert m["n_classes"] == 4 and m["train_images"] + m["test_images"] == 4 * 16
    assert 0 < m["box_area_fraction_mean"] < 1  # the cars sit inside a larger frame
    assert m.get("mode_L_images", 0) + m.get("mode_RGB_images", 0) == m["image_stats_sampled"]
    figs = _artifacts(run.info.run_id, "figures")
    assert {"figures/sample_images.png", "figures/image_sizes.png", "figures/aspect_ratio.png",
            "figures/colour_modes.png", "figures/box_area_fraction.png"} <= figs
    assert run.data.tags["carsml.data_layout"] == "devkit"


def test_real_sample_jpegs_in_class_folders(shared_data: Path, tmp_path: Path) -> None:
    index = pd.read_csv(shared_data / "sample" / "sample_index.csv")
    root = tmp_path / "cars"
    for row in index.itertuples(index=False):
        folder = root / "train" / row.class_name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "sample" / "cars_train_bbox_cropped" / row.fname, folder / row.fname)
    run_experiment("data_analysis", {"data": str(root), "sample_images": 4, "image_stats_limit": 0})
    run = _only_run()
    m = run.data.metrics
    assert m["train_images"] == len(index) == 236 and m["n_classes"] == index["class_name"].nunique()
    assert m["box_area_fraction_mean"] == pytest.approx(1.0)  # whole-image boxes for plain class folders
    assert m["image_width_median"] > 100  # real JPEGs of varying sizes
    assert run.data.tags["carsml.data_layout"] == "class_folders"
    # the same real JPEGs through the decoded cache that training reads
    dataset = load_dataset(root)
    decoded = build_cache(dataset.table, 40, cache_dir=tmp_path / "cache")
    assert decoded.images.shape == (236, 40, 40, 3) and not decoded.skipped
    assert sorted(decoded.labels.tolist()) == sorted(dataset.table["label"].tolist())
    assert decoded.images.reshape(236, -1).std(axis=1).min() > 5  # every crop holds real pixels
