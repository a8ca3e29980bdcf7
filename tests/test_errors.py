"""errors (study rows 4/7): misclassification analysis of the shared trained run, through the Python API and a real
`mlflow run`; the class-name structure behind the fine-grained metrics; and the bad inputs every analysis entry point
(errors, tta, new_category) must refuse before a run exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from carsml.cli import run_experiment
from carsml.data.classnames import parse_class_name, relation
from carsml.errors import CarsmlError, ConfigError, DataError
from carsml.experiments.analysis import calibration, cluster_order, confused_pairs, most_confused_block
from carsml.tracking import tags as tag
from tests.conftest import REPO, TINY, TRAINED_RUN

FIGURES = {"confusion_clustered_test.png", "confusion_zoom_test.png", "confused_pairs_test.png",
           "worst_classes_test.png", "misclassified_gallery_test.png", "confidence_histogram_test.png",
           "reliability_diagram_test.png"}
TABLES = {"confusion_matrix_test.csv", "confusion_matrix_test_clustered.csv", "confused_pairs_test.csv",
          "per_class_test.csv", "errors_test.csv", "calibration_test.csv", "error_relations.csv"}


def _names(run_id: str, folder: str) -> set[str]:
    return {Path(a.path).name for a in MlflowClient().list_artifacts(run_id, folder)}


def _csv(run_id: str, path: str) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def _all_run_ids() -> set[str]:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id for r in client.search_runs(experiments)} if experiments else set()


def _source_class_names(run_id: str) -> list[str]:
    from carsml.tracking.models import load_model

    return load_model(run_id)[1]["class_names"]


def test_errors_analyses_the_trained_run(trained_run: str) -> None:
    report = run_experiment("errors", {"run_id": trained_run, "device": "cpu", "gallery": 6, "zoom_classes": 4})
    run = MlflowClient().get_run(report.run_id)
    source = MlflowClient().get_run(trained_run)
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert run.data.tags["carsml.source_run_id"] == trained_run
    assert run.data.tags["carsml.source_model_uri"] == source.data.tags["carsml.model_uri"]
    # the same test split and model: the accuracy the training run logged, recomputed
    n_test = m["test_images"]
    assert n_test == TRAINED_RUN["synth_classes"] * TRAINED_RUN["synth_images_per_class"] / 2
    assert m["test_acc"] == pytest.approx(source.data.metrics["test_acc"], abs=1.5 / n_test)
    assert m["test_errors"] == round((1 - m["test_acc"]) * n_test)
    assert _names(report.run_id, "figures") >= FIGURES and _names(report.run_id, "tables") >= TABLES

    names = _source_class_names(trained_run)
    counts = _csv(report.run_id, "tables/confusion_matrix_test.csv").set_index("true\\predicted")
    assert list(counts.index) == names and int(counts.to_numpy().sum()) == n_test
    pairs = _csv(report.run_id, "tables/confused_pairs_test.csv")
    assert len(pairs) > 0 and pairs["count"].is_monotonic_decreasing
    for row in pairs.itertuples():  # real class names, counts read off the confusion matrix
        assert counts.loc[row.true_class, row.predicted_class] == row.count and row.true_class != row.predicted_class
    per_class = _csv(report.run_id, "tables/per_class_test.csv")
    assert per_class["support"].sum() == n_test
    assert (per_class["correct"] / per_class["support"]).to_numpy() == pytest.approx(per_class["accuracy"].to_numpy())
    errors = _csv(report.run_id, "tables/errors_test.csv")
    assert len(errors) == m["test_errors"] and set(errors["predicted_class"]) <= set(names)
    assert (errors["true_class"] != errors["predicted_class"]).all()

    assert 0 <= m["ece"] <= 1 and 0 < m["mean_confidence"] <= 1
    assert 0 <= m["errors_year_only_share"] <= m["errors_same_make_model_share"] <= m["errors_same_model_line_share"]
    assert m["errors_same_model_line_share"] <= m["errors_same_make_share"] <= 1
    relations = _csv(report.run_id, "tables/error_relations.csv")
    assert relations["errors"].sum() == m["test_errors"]


def test_errors_by_model_uri_on_the_validation_split(trained_run: str) -> None:
    uri = MlflowClient().get_run(trained_run).data.tags["carsml.model_uri"]
    report = run_experiment("errors", {"run_id": uri, "split": "val", "device": "cpu", "gallery": 2})
    run = MlflowClient().get_run(report.run_id)
    assert run.data.tags["carsml.source_run_id"] == trained_run  # found through the model's bundle
    membership = _csv(trained_run, "data/split_membership.csv")
    val = set(membership.loc[membership["role"] == "val", "fname"])
    assert run.data.metrics["val_images"] == len(val)  # the validation images the source run held out
    assert set(_csv(report.run_id, "tables/errors_val.csv")["fname"]) <= val
    assert {"confusion_clustered_val.png", "misclassified_gallery_val.png"} <= _names(report.run_id, "figures")


def test_mlflow_run_errors_entry_point(trained_run: str, tmp_path: Path) -> None:
    """The acceptance path: `mlflow run . -e errors --env-manager local -P run_id=...` in a real process."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "errors", "--env-manager", "local",
           "--experiment-name", "stanford-cars", "-P", f"run_id={trained_run}", "-P", "device=cpu",
           "-P", "gallery=4"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("stanford-cars").experiment_id],
        f"tags.carsml.entry_point = 'errors' and tags.carsml.source_run_id = '{trained_run}' "
        f"and params.gallery = '4'")
    launched = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "errors"]
    assert len(launched) == 1 and launched[0].info.status == "FINISHED"
    assert _names(launched[0].info.run_id, "figures") >= FIGURES
    assert launched[0].data.metrics["test_acc"] == pytest.approx(
        MlflowClient().get_run(trained_run).data.metrics["test_acc"], abs=0.02)


# ------------------------------------------------------------------------------------------ class-name structure

@pytest.mark.parametrize("name, parts", [
    ("Chevrolet Express Cargo Van 2007", ("Chevrolet", "Express", "Cargo Van", "2007")),
    ("Aston Martin V8 Vantage Coupe 2012", ("Aston Martin", "V8 Vantage", "Coupe", "2012")),
    ("AM General Hummer SUV 2000", ("AM General", "Hummer", "SUV", "2000")),
    ("Dodge Ram Pickup 3500 Crew Cab 2010", ("Dodge", "Ram Pickup 3500", "Crew Cab", "2010")),
    ("Chevrolet Corvette ZR1 2012", ("Chevrolet", "Corvette ZR1", "", "2012")),
    ("Vexa Corsa Mk2 Crew Cab 2004", ("Vexa", "Corsa Mk2", "Crew Cab", "2004")),  # synthetic names
])
def test_class_names_are_parsed_into_make_model_body_year(name: str, parts: tuple[str, ...]) -> None:
    assert tuple(parse_class_name(name)) == parts


@pytest.mark.parametrize("true, pred, kind", [
    ("Chevrolet Express Cargo Van 2007", "Chevrolet Express Van 2007", "body_only"),
    ("Ford F-150 Regular Cab 2012", "Ford F-150 Regular Cab 2007", "year_only"),
    ("Dodge Durango SUV 2012", "Dodge Durango SUV 2007", "year_only"),
    ("Dodge Dakota Crew Cab 2010", "Dodge Dakota Club Cab 2007", "same_make_model"),
    ("Dodge Charger Sedan 2012", "Dodge Charger SRT-8 2009", "same_model_line"),
    ("Audi S5 Coupe 2012", "Audi S4 Sedan 2012", "same_make"),
    ("BMW X5 SUV 2007", "Volvo XC90 SUV 2007", "other"),
])
def test_error_relations(true: str, pred: str, kind: str) -> None:
    assert relation(true, pred) == kind


def test_real_class_names_parse(shared_data: Path) -> None:
    names = pd.read_csv(shared_data / "kaggle" / "names.csv", header=None)[0].tolist()
    parsed = [parse_class_name(n) for n in names]
    assert len(names) == 196 and all(p.year and p.make and p.model for p in parsed)
    assert sum(bool(p.body) for p in parsed) >= 175  # the few without a body style: "Corvette ZR1", "HHR SS", ...
    kinds: dict[str, set] = {}
    for a in names:
        for b in names:
            if a < b:
                kinds.setdefault(relation(a, b), set()).add((a, b))
    assert len(kinds["year_only"]) == 7 and len(kinds["body_only"]) == 13  # the dataset's own near-duplicates
    assert ("Volkswagen Golf Hatchback 1991", "Volkswagen Golf Hatchback 2012") in kinds["year_only"]
    assert ("Chevrolet Express Cargo Van 2007", "Chevrolet Express Van 2007") in kinds["body_only"]
    assert ("Chevrolet Silverado 1500 Classic Extended Cab 2007",
            "Chevrolet Silverado 1500 Extended Cab 2012") in kinds["same_model_line"]


# ------------------------------------------------------------------------------------------ pieces of the analysis

def test_expected_calibration_error() -> None:
    labels = np.array([0, 0, 1, 1])
    overconfident = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])  # 90 % sure, right half the time
    ece, table = calibration(overconfident, labels, bins=10)
    assert ece == pytest.approx(0.4) and table["count"].sum() == 4
    calibrated = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert calibration(calibrated, labels, bins=10)[0] == pytest.approx(0.0)


def test_clustering_puts_confused_classes_side_by_side() -> None:
    counts = np.diag([10] * 6)
    for a, b in ((0, 3), (1, 4), (2, 5)):  # confused pairs, interleaved in class order
        counts[a, b] = counts[b, a] = 4
    counts[1, 4] = counts[4, 1] = 6  # the most confused pair
    order = list(cluster_order(counts))
    for a, b in ((0, 3), (1, 4), (2, 5)):
        assert abs(order.index(a) - order.index(b)) == 1
    assert set(most_confused_block(counts, np.array(order), 2)) == {1, 4}
    pairs = confused_pairs(counts, [f"c{i}" for i in range(6)], top=3)
    assert list(pairs["count"]) == [6, 6, 4] and {pairs.loc[0, "true_id"], pairs.loc[0, "predicted_id"]} == {1, 4}


# ------------------------------------------------------------------------------- bad input, every entry point

ANALYSES = ["errors", "tta", "new_category"]


@pytest.fixture
def analysis_run(trained_run: str) -> str:
    """A run that holds no model (data_analysis), in the trained store."""
    run_experiment("data_analysis", {k: TINY[k] for k in ("synth_classes", "synth_images_per_class")}
                   | {"sample_images": 2, "image_stats_limit": 10})
    return mlflow.last_active_run().info.run_id


@pytest.mark.parametrize("entry", ANALYSES)
@pytest.mark.parametrize("ref, error, fragment", [
    ("0123456789abcdef0123456789abcdef", CarsmlError, "Unknown MLflow run id"),
    ("models:/m-0123456789abcdef0123456789abcdef", CarsmlError, "Could not load model"),
    ("/tmp/weights.pt", ConfigError, "looks like a file path"),
])
def test_unknown_models_are_refused_before_a_run(entry: str, ref: str, error: type, fragment: str,
                                                 trained_run: str) -> None:
    before = _all_run_ids()
    with pytest.raises(error, match=fragment):
        run_experiment(entry, {"run_id": ref, "device": "cpu"})
    assert _all_run_ids() == before


@pytest.mark.parametrize("entry", ANALYSES)
def test_without_run_id_an_experiment_without_trained_runs_is_refused(entry: str, trained_run: str) -> None:
    before = _all_run_ids()
    with pytest.raises(CarsmlError, match="run_id: not given, and experiment 'no-training-here' .* holds no "
                                          "finished training run"):
        run_experiment(entry, {"device": "cpu", "experiment_name": "no-training-here"})
    assert _all_run_ids() == before


def test_without_run_id_the_best_trained_run_is_analysed(trained_run: str) -> None:
    report = run_experiment("errors", {"device": "cpu", "gallery": 2})
    assert MlflowClient().get_run(report.run_id).data.tags[tag.SOURCE_RUN_ID] == trained_run


@pytest.mark.parametrize("entry", ANALYSES)
def test_a_run_without_a_model_is_refused(entry: str, analysis_run: str) -> None:
    before = _all_run_ids()
    with pytest.raises(CarsmlError, match=f"Run {analysis_run} .*holds no carsml model"):
        run_experiment(entry, {"run_id": analysis_run, "device": "cpu"})
    assert _all_run_ids() == before


def test_data_whose_classes_differ_from_the_model_is_refused(trained_run: str) -> None:
    before = _all_run_ids()
    with pytest.raises(DataError, match="do not match the model"):
        run_experiment("errors", {"run_id": trained_run, "synth_classes": TRAINED_RUN["synth_classes"] + 2})
    with pytest.raises(ConfigError, match="trained at 32 px"):  # a flatten head takes one input size only
        run_experiment("errors", {"run_id": trained_run, "image_size": 64})
    with pytest.raises(ConfigError, match="'split': expected one of test, val"):
        run_experiment("errors", {"run_id": trained_run, "split": "train"})
    with pytest.raises(ConfigError, match="'gallery': expected a positive integer"):
        run_experiment("errors", {"run_id": trained_run, "gallery": 0})
    assert _all_run_ids() == before
