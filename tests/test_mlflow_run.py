"""The MLproject entry points through a real `mlflow run . --env-manager local` (the way users start them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TINY


def mlflow_run(entry: str, params: dict[str, object], cwd: Path) -> subprocess.CompletedProcess:
    """`mlflow run` of this repo with the venv's bin first on PATH (so `carsml` resolves) and the test's store."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
            "--experiment-name", "stanford-cars"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _runs() -> list[mlflow.entities.Run]:
    return MlflowClient().search_runs([mlflow.get_experiment_by_name("stanford-cars").experiment_id])


def test_mlflow_run_kfold_improved(isolated: Path) -> None:
    done = mlflow_run("kfold_improved", {**TINY, "folds": 2}, isolated)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = _runs()
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and len(children) == 2
    assert parent[0].info.status == "FINISHED" and "cv_test_acc_mean" in parent[0].data.metrics
    assert parent[0].data.tags["mlflow.project.entryPoint"] == "kfold_improved"  # the run mlflow created is ours
    for child in children:
        steps = [m.step for m in MlflowClient().get_metric_history(child.info.run_id, "val_acc")]
        assert steps == [1, 2]


def test_mlflow_run_data_analysis_on_real_annotations(isolated: Path, shared_data: Path) -> None:
    done = mlflow_run("data_analysis", {"data": shared_data}, isolated)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = _runs()
    assert run.data.metrics["train_images"] == 8144 and run.data.metrics["test_images"] == 8041
    assert run.data.params["data"] == str(shared_data)


def test_mlflow_run_bad_option_fails_without_a_dangling_run(isolated: Path) -> None:
    done = mlflow_run("improved", {**TINY, "optimizer": "adamax"}, isolated)
    assert done.returncode != 0 and "adamax" in done.stderr
    (run,) = _runs()  # mlflow run creates the run before our code starts; it must not stay RUNNING
    assert run.info.status == "FAILED"


def test_mlflow_run_study_twice_keeps_one_parent_and_reuses_its_steps(isolated: Path) -> None:
    params = {"steps": "data_analysis", "device": "cpu",
              "set": "all.synth_classes=4,all.synth_images_per_class=16,data_analysis.sample_images=2,"
                     "data_analysis.image_stats_limit=10"}
    first = mlflow_run("study", params, isolated)
    assert first.returncode == 0, first.stderr[-3000:]
    again = mlflow_run("study", params, isolated)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "study step data_analysis   reused   run" in again.stdout
    runs = _runs()  # the run `mlflow run` created the second time was replaced by the study it continues
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (step,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and step.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"
