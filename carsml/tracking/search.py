"""Reading MLflow back: a run by id, a run's config typed again, the run that trained a model, and run searches
(the queries name carsml's tags through `tags`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from carsml.config import load_config, options
from carsml.errors import CarsmlError
from carsml.tracking import tags as tag
from carsml.tracking.registry import CHAMPION, alias_version
from carsml.tracking.runs import shown_uri


def get_run(run_id: str, option: str) -> Run:
    """The run `run_id` named by option `option`; a CarsmlError naming both when this tracking store lacks it."""
    try:
        return MlflowClient().get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException or a connection error: either way there is no such run
        raise CarsmlError(f"{option}={run_id!r}: no such MLflow run in {shown_uri(mlflow.get_tracking_uri())} "
                          f"({exc})") from None


def config_from_run(run: Run, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config of a carsml run: its entry point's options typed again from the run's params (params are
    strings), defaults for options the run does not record (an older carsml), `overrides` on top."""
    entry = run.data.tags.get(tag.ENTRY_POINT, "")
    if not entry:
        raise CarsmlError(f"Run {run.info.run_id} was not made by carsml (no {tag.ENTRY_POINT} tag); its config "
                          f"cannot be read back")
    known = options(entry)
    params = {k: v for k, v in run.data.params.items() if k in known}
    return load_config(entry, {**params, **(overrides or {})})


def model_training_run(ref: str, model_uri: str, info: dict[str, Any]) -> Run:
    """The run that trained the model `model_uri` (resolved from `ref`: a run id, runs:/ or models:/ URI)."""
    if ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].split("/", 1)[0]
    elif ref.startswith("models:/"):
        run_id = info.get("source_run_id") or _logged_model_run(model_uri)
    else:
        run_id = ref
    if not run_id:
        raise CarsmlError(f"Model {model_uri!r} does not record the run that trained it; pass that run's id as run_id")
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise CarsmlError(f"The run {run_id!r} that trained {model_uri!r} is not in this tracking store "
                          f"({mlflow.get_tracking_uri()}): {exc}") from None


def _logged_model_run(model_uri: str) -> str:
    model_id = model_uri[len("models:/"):].split("/", 1)[0]
    try:
        return mlflow.get_logged_model(model_id).source_run_id or ""
    except MlflowException:
        return ""


def tracking_uri() -> str:
    """The tracking URI in use, as messages show it (credentials hidden)."""
    return shown_uri(mlflow.get_tracking_uri())


def experiment_id(name: str) -> str | None:
    """The id of the experiment `name`, or None when this tracking store has no such experiment."""
    experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else None


def experiment_names() -> list[str]:
    """Every experiment's name, sorted (for messages listing what exists)."""
    return sorted(e.name for e in mlflow.search_experiments())


def search_models(experiment_ids: list[str], filter_string: str, order_by: str) -> list[Any]:
    """LoggedModels matching `filter_string` (e.g. on `tags.`carsml.model``), best first by metric `order_by`
    (descending), through MLflow 3's `search_logged_models`."""
    return mlflow.search_logged_models(experiment_ids=experiment_ids, filter_string=filter_string,
                                       order_by=[{"field_name": f"metrics.{order_by}", "ascending": False}],
                                       output_format="list")


def search_runs(experiment_ids: list[str], filter_string: str = "", order_by: list[str] | None = None,
                max_results: int = 50_000) -> list[Run]:
    """Runs matching `filter_string`, all pages."""
    client, runs, token = MlflowClient(), [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, order_by=order_by,
                                  max_results=min(max_results - len(runs), 1000), page_token=token)
        runs.extend(page)
        token = page.token
        if not token or len(runs) >= max_results:
            return runs


def child_runs(parent: Run) -> list[Run]:
    """The runs nested under `parent`."""
    return search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """Every logged (step, value) of metric `key` of a run, in step order."""
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def searched_experiment(experiment_name: str) -> tuple[str | None, str]:
    """(id or None, description) of the experiment an entry point searches for its input runs: under `mlflow run`
    the launched run's own (--experiment-name decides, as for the run itself), else `experiment_name`."""
    if os.environ.get("MLFLOW_RUN_ID") and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"], f"experiment id {os.environ['MLFLOW_EXPERIMENT_ID']} (mlflow run)"
    return experiment_id(experiment_name), f"experiment {experiment_name!r}"


TRAINING_ENTRY_POINTS = ("improved", "baseline", "transfer", "kfold_improved", "kfold_baseline")


def best_trained_run(experiment_name: str) -> Run:
    """The finished training run (TRAINING_ENTRY_POINTS; k-fold children included) with a logged model and the highest
    validation accuracy, ties to the lower validation loss: the model an analysis takes when no run_id is given."""
    searched, where = searched_experiment(experiment_name)
    query = "attributes.status = 'FINISHED' and metrics.best_val_acc >= 0"  # tags allow no IN: filtered below
    runs = [r for r in (search_runs([searched], query) if searched else [])
            if r.data.tags.get(tag.ENTRY_POINT) in TRAINING_ENTRY_POINTS and r.data.tags.get(tag.MODEL_URI)]
    if not runs:
        raise CarsmlError(f"run_id: not given, and {where} (tracking URI {tracking_uri()}) holds no finished training "
                          f"run with a logged model and a validation accuracy; train one (e.g. `carsml improved`) "
                          f"or pass run_id=<MLflow run id or models:/ URI>")
    return min(runs, key=lambda r: (-r.data.metrics["best_val_acc"], r.data.metrics.get("best_val_loss", 0.0),
                                    r.info.start_time))


def _download(**where: str) -> bytes | None:
    """The bytes of one artifact file (`mlflow.artifacts.download_artifacts` arguments), None when it is absent."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(**where, dst_path=tmp))
        except (MlflowException, OSError):
            return None
        return local.read_bytes() if local.is_file() else None


def run_artifact(run_id: str, path: str) -> bytes | None:
    """The bytes of the artifact file `path` of run `run_id` (e.g. `figures/mean_curves.png`), or None when the run
    has no such file."""
    return _download(run_id=run_id, artifact_path=path)


def logged_model_artifact(model_uri: str, path: str) -> bytes | None:
    """The bytes of the file `path` inside the logged model `model_uri` (`models:/m-<id>`; e.g. a carsml bundle's
    `artifacts/bundle/model.json`), or None when there is no such model or file."""
    try:
        location = MlflowClient().get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    except MlflowException:
        return None
    return _download(artifact_uri=f"{location.rstrip('/')}/{path.lstrip('/')}")


def registered_alias(name: str, alias: str = CHAMPION) -> ModelVersion | None:
    """The version of registered model `name` that `alias` points at, or None (no such model or alias)."""
    return alias_version(MlflowClient(), name, alias)


def finished_runs(experiment_id: str, entry_point: str) -> list[Run]:
    """The finished runs of carsml entry point `entry_point` in an experiment, newest first."""
    query = f"tags.`{tag.ENTRY_POINT}` = '{entry_point}' and attributes.status = 'FINISHED'"
    return search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])


def searched_experiment_name(experiment_name: str) -> str:
    """The name of the experiment `searched_experiment` picks: under `mlflow run` the launched run's, else
    `experiment_name` (also when no such experiment exists)."""
    searched, _ = searched_experiment(experiment_name)
    found = mlflow.get_experiment(searched) if searched is not None else None
    return found.name if found is not None else experiment_name


def param_value(run: Run, key: str) -> str | None:
    """A run's param as carsml logged it: `mlflow run` logs an empty -P value as the shell-quoted `''`."""
    value = run.data.params.get(key)
    return "" if value == "''" else value
