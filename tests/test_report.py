"""`carsml report`: the study's tables rebuilt from a real SQLite tracking store alone.

One store per module: tiny real runs of the entry points whose metric names the report must read (baseline, improved,
kfold_improved, errors, tta, new_category) and minimal runs logged directly with carsml's tags where a real run would
be too slow (data_analysis, transfer_all + transfer with a logged model's bundle info, features_rf, tune, registry
champions), their metrics produced by the entry points' own functions where they have one. Every table number must
EQUAL what its run logged, every row must name its run, missing steps are listed with their command, and report.html
is self-contained."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from carsml.cli import app, run_experiment
from carsml.errors import CarsmlError
from carsml.experiments.data_analysis import split_statistics
from carsml.experiments.features_rf import scores
from carsml.experiments.markdown import frame_markdown, markdown_table
from carsml.experiments.report import Missing, Report, Table, build_report, to_html, to_markdown
from carsml.tracking import registry
from carsml.tracking import tags as tag
from carsml.tracking.runs import setup_tracking
from tests.conftest import REPO, TINY
from tests.test_promote import tracking_env

FULL, PARTIAL = "report-full", "report-partial"
RESNET50_BACKBONE = 23_508_032  # resnet50 without its fc (2048 x 4 + 4 parameters for 4 classes)


def _direct(entry: str, metrics: dict[str, float], *, experiment: str = FULL, tags: dict[str, str] | None = None,
            params: dict[str, Any] | None = None, parent: str = "") -> str:
    """A finished run logged directly, with the tags carsml's entry points leave behind."""
    mlflow.set_experiment(experiment)
    run_tags = {tag.ENTRY_POINT: entry, **(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
    with mlflow.start_run(tags=run_tags) as run:
        mlflow.log_params(params or {})
        mlflow.log_metrics(metrics)
    return run.info.run_id


def _logged_model(run_id: str, model_config: dict[str, Any]) -> str:
    """A LoggedModel of `run_id` holding only a carsml bundle's info (as tracking.models.log_model stores it)."""
    client, folder = MlflowClient(), Path(f"bundle-{run_id}")
    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name="model", source_run_id=run_id)
    (folder / "artifacts" / "bundle").mkdir(parents=True)
    (folder / "artifacts" / "bundle" / "model.json").write_text(json.dumps({"model_config": model_config}))
    client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, "READY")
    client.set_tag(run_id, tag.MODEL_URI, f"models:/{model.model_id}")
    return f"models:/{model.model_id}"


def _direct_runs(ids: dict[str, Any]) -> None:
    """data_analysis, transfer_all + transfer, features_rf, tune and the registry champions in FULL; a partial
    experiment with only data_analysis and improved; an empty one."""
    counts = pd.DataFrame({"train": [10, 12, 8], "test": [9, 11, 7]})
    ids["data"] = _direct("data_analysis", split_statistics(counts, ["train", "test"]))
    parent = _direct("transfer_all", {}, params={"models": "resnet50,vgg16"})
    finals = {"n_params": RESNET50_BACKBONE + 8196, "best_val_loss": 0.9, "best_val_acc": 0.6, "test_loss": 1.1,
              "test_acc": 0.55, "test_correct": 11, "test_errors": 9, "train_seconds": 12.5}
    ids["resnet50"] = _direct("transfer", finals, tags={tag.MODEL: "resnet50"}, parent=parent)
    ids["vgg16"] = _direct("transfer", {**finals, "n_params": 134_276_932, "best_val_acc": 0.3},
                           tags={tag.MODEL: "vgg16"}, parent=parent)
    _direct("transfer", {**finals, "best_val_acc": 0.99}, tags={tag.MODEL: "resnet50"})  # outside the parent
    net_uri = _logged_model(ids["resnet50"], {"name": "resnet50", "num_classes": 4, "image_size": 32})
    labels, rng = np.array([0, 1, 2, 3] * 3), np.random.default_rng(0)
    rf_metrics = {k: v for head in ("net", "rf", "logreg", "knn") for split in ("val", "test")
                  for k, v in scores(labels, rng.integers(0, 4, len(labels)), f"{head}_{split}").items()}
    ids["rf"] = _direct("features_rf", rf_metrics, tags={tag.MODEL: "resnet50", tag.BACKBONE_RUN_ID: ids["resnet50"]})
    rf_uri = _logged_model(ids["rf"], {"name": "resnet50", "num_classes": 4, "image_size": 32})
    ids["tune"] = _direct("tune", {"best_value": 0.75, "best_trial_number": 1, "best_lr": 0.00123, "best_dropout": 0.25,
                                   "best_weight_decay": 1.5e-5, "n_trials_complete": 2, "n_trials_pruned": 1,
                                   "n_trials_failed": 0, "trial_epochs_saved_by_pruning": 2},
                          tags={"optuna.study_name": "carsml-tune"})
    _direct("tune", {"best_val_acc": 0.5}, tags={tag.TRIAL_NUMBER: "1"}, parent=ids["tune"])  # newer, a trial
    for name, uri, source, val in (("carsml-resnet50", net_uri, ids["resnet50"], 0.6),
                                   ("carsml-resnet50-rf", rf_uri, ids["rf"], rf_metrics["rf_val_acc"])):
        version, _ = registry.register(name, uri, {"source_run_id": source, registry.SCORE_TAG: repr(val)})
        registry.promote(name, version)
    ids["partial_data"] = _direct("data_analysis", split_statistics(counts, ["train", "test"]), experiment=PARTIAL)
    ids["partial_improved"] = _direct("improved", {"best_val_acc": 0.5, "test_acc": 0.4}, experiment=PARTIAL)
    for epoch, (acc, loss) in enumerate([(0.3, 1.5), (0.45, 1.2)], 1):
        mlflow.log_metrics({"train_acc": acc, "train_loss": loss}, step=epoch, run_id=ids["partial_improved"])
    mlflow.create_experiment("report-empty")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{folder}/mlflow.db"
    with tracking_env(uri, folder, cache_dir):
        train = {**TINY, "experiment_name": FULL}
        ids: dict[str, Any] = {"uri": uri}
        for entry in ("baseline", "improved"):
            run_experiment(entry, train)
            ids[entry] = mlflow.last_active_run().info.run_id
        ids["folds"] = run_experiment("kfold_improved", {**train, "folds": 2})
        ids["kfold"] = mlflow.last_active_run().info.run_id
        source = {"run_id": ids["improved"], "device": "cpu", "experiment_name": FULL}
        ids["errors"] = run_experiment("errors", {**source, "gallery": 2})
        ids["tta"] = run_experiment("tta", {**source, "views": 2})
        ids["new"] = run_experiment("new_category", {**source, "mode": "warmstart", "epochs": 1})
        _direct_runs(ids)
    return ids


@pytest.fixture
def uri(store: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    setup_tracking()
    return store["uri"]


def _tables(report: Report, section: str) -> list[Table]:
    return next(s.tables for s in report.sections if s.title.startswith(section))


def _metrics(run_id: str) -> dict[str, float]:
    return MlflowClient().get_run(run_id).data.metrics


def _history(run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in MlflowClient().get_metric_history(run_id, key)}


def _rows(table: Table) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """Each row with the metrics of the run it names."""
    return [(row, _metrics(run_id)) for row, run_id in zip(table.frame.to_dict("records"), table.run_ids, strict=True)]


def test_every_number_equals_what_its_run_logged_and_names_that_run(store: dict[str, Any], uri: str) -> None:
    report = build_report(FULL)
    (data,) = _tables(report, "Data statistics")
    assert data.run_ids == [store["data"]] * 2 and list(data.frame["split"]) == ["train", "test"]
    for row, m in _rows(data):
        assert (row["images"], row["classes"], row["per-class min"], row["per-class mean"], row["per-class max"]) == (
            m[f"{row['split']}_images"], m["n_classes"], m[f"{row['split']}_class_count_min"],
            m[f"{row['split']}_class_count_mean"], m[f"{row['split']}_class_count_max"])
    (trained,) = _tables(report, "Baseline vs improved")
    assert trained.run_ids == [store["baseline"], store["improved"]]
    for (row, m), run_id in zip(_rows(trained), trained.run_ids, strict=True):
        assert row["final train acc"] == _history(run_id, "train_acc")[TINY["epochs"]]
        assert row["final train loss"] == _history(run_id, "train_loss")[TINY["epochs"]]
        assert all(row[k] == m[k] for k in ("best_val_acc", "best_val_loss", "test_acc", "test_loss", "n_params",
                                            "train_seconds"))
    (folds,) = _tables(report, "K-fold cross-validation: kfold_improved")
    assert folds.run_ids == [*store["folds"]["run_id"], store["kfold"], store["kfold"]]
    for row, m in _rows(folds)[:2]:
        best = int(m["best_epoch"])
        assert row["train acc epoch"] == f"selected {best}"
        assert row["train acc"] == _history(folds.run_ids[int(row["fold"])], "train_acc")[best]
        assert all(row[k] == m[k] for k in ("best_val_acc", "test_acc", "test_loss"))
    children = folds.frame.iloc[:2]
    assert list(folds.frame["fold"]) == ["0", "1", "mean", "std"]
    for column in ("train acc", "best_val_acc", "test_acc", "test_loss"):  # train accuracy too
        assert folds.frame[column].iloc[2] == pytest.approx(children[column].mean(), rel=1e-12)
        assert folds.frame[column].iloc[3] == pytest.approx(children[column].std(ddof=0), abs=1e-12)
    assert folds.frame["test_acc"].iloc[2] == pytest.approx(_metrics(store["kfold"])["cv_test_acc_mean"], rel=1e-12)
    summary, *pairs = _tables(report, "Misclassification analysis")
    ((row, m),) = _rows(summary)
    assert summary.run_ids == [store["errors"].run_id]
    assert all(row[k] == m[k] for k in ("test_acc", "test_errors", "ece", "errors_same_make_model_share"))
    expected = store["errors"].pairs.head(5)
    assert pairs and list(pairs[0].frame["true class"]) == list(expected["true_class"])
    assert list(pairs[0].frame["predicted as"]) == list(expected["predicted_class"])
    assert list(pairs[0].frame["images"]) == list(expected["count"])
    (tta,) = _tables(report, "Test-time augmentation")
    ((row, m),) = _rows(tta)
    assert tta.run_ids == [store["tta"].run_id] and (row["policy"], row["aggregation"], row["views"]) == ("light",
                                                                                                        "mean", 2)
    assert (row["acc no TTA"], row["acc TTA mean"], row["acc TTA vote"]) == (
        m["test_acc_no_tta"], m["test_acc_tta_mean"], m["test_acc_tta_vote"])
    (new,) = _tables(report, "A new category")
    ((row, m),) = _rows(new)
    assert new.run_ids == [store["new"].run_id] and row["mode"] == "warmstart"
    assert all(row[k] == m[k] == store["new"].metrics[k] for k in ("new_class_acc", "new_class_recall",
                                                                  "new_class_precision", "forgetting"))
    (transfer,) = _tables(report, "Transfer learning")
    assert transfer.run_ids == [store["resnet50"], store["vgg16"]]  # the parent's children, in its models order
    for row, m in _rows(transfer):
        assert (row["params"], row["val_acc"], row["test_loss"], row["test_acc"]) == (
            m["n_params"], m["best_val_acc"], m["test_loss"], m["test_acc"])
    assert transfer.frame["params without classifier"].iloc[0] == RESNET50_BACKBONE
    assert np.isnan(transfer.frame["params without classifier"].iloc[1])  # vgg16 logged no model
    (heads,) = _tables(report, "RandomForest")
    names = {"network": "net", "RandomForest": "rf", "logistic regression": "logreg", "kNN": "knn"}
    for row, m in _rows(heads):
        head = names[row["head"]]
        assert (row["val acc"], row["test acc"]) == (m[f"{head}_val_acc"], m[f"{head}_test_acc"])
    (tune,) = _tables(report, "Hyper-parameter tuning")
    ((row, m),) = _rows(tune)
    assert tune.run_ids == [store["tune"]]  # the parent, not its (newer) trial
    assert {k: row[k] for k in m} == m
    (champions,) = _tables(report, "Registered champions")
    assert champions.run_ids == [store["resnet50"], store["rf"]]
    assert list(champions.frame["version"]) == [1, 1]
    assert champions.frame["val_acc"].iloc[0] == 0.6
    assert champions.frame["val_acc"].iloc[1] == _metrics(store["rf"])["rf_val_acc"]
    markdown = to_markdown(report)
    for table in (t for s in report.sections for t in s.tables):
        assert list(table.frame["run"]) == [run_id[:8] for run_id in table.run_ids]
        for run_id in table.run_ids:
            assert f"[{run_id[:8]}](#/experiments/{report.experiment_id}/runs/{run_id})" in markdown
    assert report.missing == [
        Missing("kfold_baseline parent run", f"carsml kfold-baseline --experiment-name {FULL}"),
        Missing("new_category run, mode scratch", f"carsml new-category --experiment-name {FULL} --mode scratch")]


def test_missing_steps_are_listed_with_their_command_and_the_rest_is_written(
        store: dict[str, Any], uri: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--experiment", PARTIAL, "--out", str(tmp_path / "out"),
                                      "--log", "false"])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "out" / "report.md").read_text()
    report = build_report(PARTIAL)
    assert to_markdown(report) == markdown
    (trained,) = _tables(report, "Baseline vs improved")
    assert trained.run_ids == [store["partial_improved"]]
    assert (trained.frame["final train acc"].iloc[0], trained.frame["final train loss"].iloc[0]) == (0.45, 1.2)
    assert _tables(report, "Data statistics")[0].run_ids == [store["partial_data"]] * 2
    flag = f"--experiment-name {PARTIAL}"
    expected = {("baseline run", f"carsml baseline {flag}"), ("errors run", f"carsml errors {flag}"),
                ("kfold_improved parent run", f"carsml kfold-improved {flag}"), ("tta run", f"carsml tta {flag}"),
                ("new_category run, mode warmstart", f"carsml new-category {flag} --mode warmstart"),
                ("transfer runs (one per model)", f"carsml transfer-all {flag}"),
                ("features_rf run", f"carsml features-rf {flag}"), ("tune parent run", f"carsml tune {flag}")}
    assert expected <= set(report.missing)
    for what, command in expected:
        assert f"- missing: {what}; produce it with `{command}`" in markdown
        assert f"missing: {what}" in result.output
    # the registry is the store's: the champions show, linked into the experiment of their source runs
    full = MlflowClient().get_experiment_by_name(FULL).experiment_id
    assert report.link(store["resnet50"]) == f"#/experiments/{full}/runs/{store['resnet50']}"


def test_an_experiment_without_runs_is_a_clear_error(store: dict[str, Any], uri: str) -> None:
    with pytest.raises(CarsmlError, match="'report-empty'.*holds no carsml runs"):
        build_report("report-empty")
    with pytest.raises(CarsmlError, match="no MLflow experiment 'no-such-experiment'.*report-full"):
        build_report("no-such-experiment")


def test_the_html_page_is_self_contained_and_both_files_are_logged(store: dict[str, Any], uri: str,
                                                                     tmp_path: Path) -> None:
    report = run_experiment("report", {"experiment_name": FULL, "out": str(tmp_path / "out")})
    page = (tmp_path / "out" / "report.html").read_text()
    assert page == to_html(report) and (tmp_path / "out" / "report.md").read_text() == to_markdown(report)
    sources = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", page)
    links = re.findall(r"""\bhref\s*=\s*["']([^"']*)""", page)
    figures = [f for s in report.sections for f in s.figures]
    assert len(figures) >= 4 and len(sources) == len(figures)  # curves x 2, k-fold mean curves, confused pairs
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert links and all(link.startswith("#/experiments/") for link in links)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    logged = mlflow.last_active_run()
    assert logged.data.tags[tag.ENTRY_POINT] == "report" and logged.info.experiment_id == report.experiment_id
    assert {a.path for a in MlflowClient().list_artifacts(logged.info.run_id)} >= {"report.md", "report.html"}
    assert build_report(FULL).missing == report.missing  # the report run itself is not a step


def test_the_results_script_rewrites_only_its_section(store: dict[str, Any], uri: str, tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    results.write_text("# Results\n\nhand-written\n\n<!-- report:start -->\nold\n<!-- report:end -->\n\nafter\n")
    spec = importlib.util.spec_from_file_location("results_report", REPO / "benchmarks" / "results_report.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--tracking-uri", uri, "--experiment", PARTIAL, "--path", str(results)])
    text = results.read_text()
    assert text.startswith("# Results\n\nhand-written\n\n<!-- report:start -->\n### carsml report: experiment")
    assert "\nold\n" not in text and text.endswith("<!-- report:end -->\n\nafter\n")
    assert "#### Data statistics" in text and f"carsml tune --experiment-name {PARTIAL}" in text


def test_markdown_tables_format_cells_one_way() -> None:
    frame = pd.DataFrame({"run": ["a|b", "c"], "acc": [0.123456, float("nan")], "epochs": [30, 25]})
    assert frame_markdown(frame).splitlines() == [
        "| run | acc | epochs |", "|---|---|---|", "| a\\|b | 0.1235 | 30 |", "| c | – | 25 |"]
    assert markdown_table(["x"], []) == "| x |\n|---|\n"
