"""MLflow run setup shared by every entry point.

Works both under `mlflow run` (which pre-creates the run and exports MLFLOW_RUN_ID) and from the `carsml` CLI (which
creates it). A run that fails is ended FAILED with the reason in the `carsml.error` tag, never left RUNNING.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

import carsml
from carsml.data.table import Dataset

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
REPO_DIR = Path(__file__).resolve().parents[2]


def setup_tracking() -> str:
    """Use MLFLOW_TRACKING_URI when set, else the SQLite store `mlflow.db` in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    return uri


def git_info() -> dict[str, str]:
    """Commit and dirty flag of the carsml checkout (empty when not a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": str(bool(dirty)).lower()}


def log_params(params: dict[str, Any]) -> None:
    """Log params, skipping keys the run already holds (`mlflow run` pre-logs every -P value as a string, and
    re-logging a key with another representation raises)."""
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params if run else {}
    fresh = {k: ("" if v is None else v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


@contextlib.contextmanager
def start_run(
    entry_point: str,
    cfg: dict[str, Any],
    *,
    run_name: str | None = None,
    nested: bool = False,
    resume_run_id: str = "",
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or join, or resume) the run for an entry point; log config, tags, and end it FAILED on error."""
    setup_tracking()
    launched_run = os.environ.get("MLFLOW_RUN_ID") if not nested else None
    if launched_run and mlflow.active_run() is None and resume_run_id and resume_run_id != launched_run:
        # `mlflow run -P resume_run_id=X` created a fresh run; continue X instead so the study keeps one run.
        MlflowClient().delete_run(launched_run)
        os.environ.pop("MLFLOW_RUN_ID")
        launched_run = None
    if resume_run_id:
        resumed = MlflowClient().get_run(resume_run_id)  # raises a clear MlflowException for unknown ids
        if not nested:  # children created after a resume must land in the resumed run's experiment
            mlflow.set_experiment(experiment_id=resumed.info.experiment_id)
        active = mlflow.start_run(run_id=resume_run_id, nested=nested)
    elif launched_run or nested:
        active = mlflow.start_run(run_name=run_name or entry_point, nested=nested)
    else:
        mlflow.set_experiment(cfg.get("experiment_name") or "stanford-cars")
        active = mlflow.start_run(run_name=run_name or entry_point)
    with active:
        info = git_info()
        base_tags = {"carsml.entry_point": entry_point, "carsml.version": carsml.__version__}
        if info:
            base_tags["carsml.git_commit"] = info["commit"]
            base_tags["carsml.git_dirty"] = info["dirty"]
            if "mlflow.source.git.commit" not in active.data.tags:
                base_tags["mlflow.source.git.commit"] = info["commit"]
        if not launched_run and not resume_run_id and run_name:
            base_tags["mlflow.runName"] = run_name
        mlflow.set_tags({**base_tags, **(tags or {})})
        log_params({k: v for k, v in cfg.items() if k != "entry_point"})
        try:
            yield active
        except KeyboardInterrupt:
            mlflow.set_tag("carsml.error", "interrupted")
            mlflow.end_run("KILLED")
            raise
        except BaseException as exc:
            mlflow.set_tag("carsml.error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.end_run("FAILED")
            raise


def log_dataset(dataset: Dataset, rows: pd.DataFrame, context: str) -> None:
    """Record which data the run saw (`mlflow.log_input`) plus the layout and digest as tags."""
    table = rows[["fname", "label", "class_name", "x1", "y1", "x2", "y2", "split"]]
    with warnings.catch_warnings():  # schema hints about integer columns and ambiguous local sources: noise here
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(table, source=str(dataset.root), targets="label",
                                     name=f"stanford-cars-{context}",
                                     digest=_rows_digest(table))
        mlflow.log_input(ds, context=context)
    mlflow.set_tags({"carsml.data_layout": dataset.layout, "carsml.data_digest": dataset.digest(),
                     "carsml.data_root": str(dataset.root), "carsml.num_classes": str(dataset.num_classes)})


def _rows_digest(table: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(table, index=False).values.tobytes()).hexdigest()[:16]


def log_figure(fig: Any, artifact_file: str) -> None:
    """Log a matplotlib figure and close it."""
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_csv(df: pd.DataFrame, artifact_file: str, *, as_table: bool = False) -> None:
    """Log a DataFrame as CSV (and as an MLflow table, viewable in the UI, when `as_table`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        df.to_csv(path, index=False)
        mlflow.log_artifact(str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)
    if as_table:
        mlflow.log_table(df.reset_index(drop=True), artifact_file.rsplit(".", 1)[0] + ".json")


def log_text(text: str, artifact_file: str) -> None:
    """Log a text artifact."""
    mlflow.log_text(text, artifact_file)
