"""What a finished entry point tells the user on the terminal: the run, its key result, the model, where artifacts went,
where to look in the MLflow UI and what to run next — read back from the tracking store, so it says what was logged."""

from __future__ import annotations

import shlex
import urllib.parse

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from carsml.tracking import tags as tag

# The key result per entry point: (label, metric) pairs shown when logged, `±` joining a mean with its std.
KEY_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "data_analysis": (("train images", "train_images"), ("test images", "test_images"), ("classes", "n_classes")),
    "errors": (("test acc", "test_acc"), ("test errors", "test_errors"), ("ECE", "ece")),
    "tta": (("test acc without TTA", "test_acc_no_tta"), ("with TTA", "test_acc_tta"), ("delta", "tta_delta")),
    "new_category": (("new-class acc", "new_class_acc"), ("old-class acc", "old_class_acc"),
                     ("forgetting", "forgetting")),
    "features_rf": (("RF test acc", "rf_test_acc"), ("network test acc", "net_test_acc")),
    "tune": (("best val acc", "best_value"), ("best trial", "best_trial_number")),
    "promote": (("val acc", "val_acc"), ("RF val acc", "rf_val_acc")),
    "kfold": (("cv test acc", "cv_test_acc_mean±cv_test_acc_std"), ("cv best val acc", "cv_best_val_acc_mean")),
    "train": (("best val acc", "best_val_acc"), ("test acc", "test_acc"), ("best epoch", "best_epoch")),
    "report": (("tables", "report_tables"), ("figures", "report_figures"), ("missing rows", "report_missing_rows")),
    "study": (("steps run", "steps_run"), ("steps reused", "steps_reused")),
}
# What a user typically runs after each entry point ({run} = this run's id, {model} its architecture (carsml.model tag
# or `model` param), {experiment} its experiment, {served} the registered network of a promote run).
NEXT: dict[str, str] = {
    "baseline": "carsml errors --run-id {run}",
    "improved": "carsml errors --run-id {run}   (or tta / new-category with the same --run-id)",
    "kfold": "carsml errors   (the best trained run of the experiment; or --run-id <a fold's run id>)",
    "study": "carsml report --out report   (the study's tables again), or the same study command: steps are reused",
    "report": "open report.html in a browser",
    "transfer": "carsml features-rf --run-id {run}   (the study's RandomForest head on this network)",
    "transfer_all": "carsml compare",
    "features_rf": "carsml promote --model {model} --experiment-name {experiment}",
    "promote": "mlflow models serve -m models:/{served}@champion --env-manager local -p 5001",
    "tune": "carsml improved --model {model} --lr {best_lr} --dropout {best_dropout} --weight-decay "
            "{best_weight_decay}   (the best trial's values, with the tune run's other options)",
    "data_analysis": "carsml improved --image-size 64 --epochs 15 --batch-size 32 --head-widths 512,256 --lr 0.001",
}


def _family(entry: str) -> str:
    if entry.startswith("kfold"):
        return "kfold"
    return entry if entry in KEY_METRICS else "train"


COUNTS = {"best_trial_number", "best_epoch", "steps_run", "steps_reused", "report_tables", "report_figures",
          "report_missing_rows"}  # key metrics that count something: shown as integers


def _fmt(value: float, name: str = "") -> str:
    whole = name in COUNTS or (float(value).is_integer() and abs(value) >= 1)
    return f"{value:.0f}" if whole else f"{value:.4f}"


def key_result(entry: str, metrics: dict[str, float]) -> str:
    """The entry point's headline numbers that the run logged, e.g. `best val acc 0.8167 · test acc 0.7917`."""
    parts = []
    for label, names in KEY_METRICS[_family(entry)]:
        mean, _, std = names.partition("±")
        if mean in metrics:
            parts.append(f"{label} {_fmt(metrics[mean], mean)}" + (f" ± {metrics[std]:.4f}" if std in metrics else ""))
    return " · ".join(parts) or "no metrics logged"


def ui_address(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where the run is in the MLflow UI (a server's own page; for a local store, the command that serves one)."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}   then http://127.0.0.1:5000/{page}"


def run_summary(run_id: str) -> list[str]:
    """The lines that end an entry point's terminal output."""
    client = MlflowClient()
    run = client.get_run(run_id)
    run_tags, info = run.data.tags, run.info
    entry = run_tags.get(tag.ENTRY_POINT, "")
    parent = run_tags.get("mlflow.parentRunId")
    artifacts = info.artifact_uri
    if urllib.parse.urlparse(artifacts).scheme in ("", "file"):
        artifacts = urllib.parse.urlparse(artifacts).path or artifacts
        artifacts += "   (local folder: other machines see it only through a server with --serve-artifacts)"
    lines = [f"run       {run_id}  {info.run_name}  {info.status}" + (f"  (parent {parent})" if parent else ""),
             f"result    {key_result(entry, run.data.metrics)}"]
    model = run_tags.get(tag.MODEL_URI) or run_tags.get(tag.RF_MODEL_URI)
    if model:
        lines.append(f"model     {model}")
    lines += [f"artifacts {artifacts}",
              f"MLflow UI {ui_address(mlflow.get_tracking_uri(), info.experiment_id, run_id)}"]
    if entry in NEXT or entry.startswith("kfold"):
        lines.append(f"next      {next_command(entry, run, client.get_experiment(info.experiment_id).name)}")
    return lines


def next_command(entry: str, run: Run, experiment: str) -> str:
    """NEXT's command for a run of `entry`, filled in from the run."""
    params = run.data.params
    model = run.data.tags.get(tag.MODEL) or params.get("model", "")
    given = params.get("model_name", "")
    served = given if given not in ("", "None") else f"carsml-{model}"
    best = {f"best_{name}": f"{run.data.metrics[f'best_{name}']:.3g}" if f"best_{name}" in run.data.metrics
            else f"<best {name.replace('_', ' ')}>" for name in ("lr", "dropout", "weight_decay")}
    template = NEXT["kfold" if entry.startswith("kfold") else entry]
    return template.format(run=run.info.run_id, model=model, experiment=shlex.quote(experiment), served=served,
                           **best)


def last_run_summary() -> list[str]:
    """`run_summary` of the run this process ran last ([] when it ran none)."""
    run = mlflow.last_active_run()
    return run_summary(run.info.run_id) if run is not None else []
