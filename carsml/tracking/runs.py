"""MLflow run setup shared by every entry point.

Works both under `mlflow run` (which pre-creates the run and exports MLFLOW_RUN_ID) and from the `carsml` CLI (which
creates it). A run that fails is ended FAILED with the reason in the `carsml.error` tag, never left RUNNING.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

import carsml
from carsml.data.table import Dataset
from carsml.errors import ConfigError
from carsml.tracking import tags as tag

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
REPO_DIR = Path(__file__).resolve().parents[2]
REACHABILITY_TIMEOUT_S = 3.0  # MLflow's own client retries an unreachable server for minutes
# Used when MLflow's store registry cannot be read (it is private API); plugins add to the registry, not to this.
_FALLBACK_SCHEMES = frozenset({"", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                               "databricks-uc", "uc"})
_SQLITE_HEADER = b"SQLite format 3\x00"
_checked_uris: set[str] = set()  # URIs already found usable in this process (the check runs once per URI)


_LIBRARY_LEVEL = logging.INFO  # the log level chosen for MLflow and Optuna (quiet_mlflow)


def library_log_level() -> int:
    """The level `quiet_mlflow` chose: Optuna sets its own level when imported, so `tune` applies this one after."""
    return _LIBRARY_LEVEL


def quiet_mlflow(quiet: bool = True) -> None:
    """Silence MLflow's INFO lines and artifact progress bars, and Optuna's per-trial lines (`library_log_level`), the
    default of the `carsml` commands (`--verbose` brings them back): each command ends with its own summary instead."""
    global _LIBRARY_LEVEL
    _LIBRARY_LEVEL = logging.WARNING if quiet else logging.INFO
    logging.getLogger("mlflow").setLevel(_LIBRARY_LEVEL)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false" if quiet else "true"


def setup_tracking() -> str:
    """Use MLFLOW_TRACKING_URI when set, else the SQLite store `mlflow.db` in the working directory.

    The URI is checked first (`check_tracking_uri`), so a malformed or unreachable one fails at once with a
    ConfigError instead of inside MLflow's retry loops once work has started.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def shown_uri(uri: str) -> str:
    """The URI as printed in messages: a password in it is replaced by `***`."""
    try:
        parts = urllib.parse.urlsplit(uri)
        if not parts.password:
            return uri
    except ValueError:  # not parseable: shown as given
        return uri
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


def _known_schemes() -> frozenset[str]:
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return frozenset(_tracking_store_registry._registry) or _FALLBACK_SCHEMES
    except (ImportError, AttributeError):  # pragma: no cover - depends on the MLflow version
        return _FALLBACK_SCHEMES


def _unusable(uri: str, problem: str, todo: str) -> ConfigError:
    return ConfigError(
        f"MLFLOW_TRACKING_URI={shown_uri(uri)!r}: {problem}. {todo}, or unset MLFLOW_TRACKING_URI to log to "
        f"{DEFAULT_TRACKING_URI} in the working directory"
    )


def _check_http(uri: str) -> None:
    parts = urllib.parse.urlsplit(uri)
    expected = "Expected http(s)://<host>:<port> of an MLflow tracking server"
    if not parts.hostname:
        raise _unusable(uri, "no host name", expected)
    try:
        _ = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        raise _unusable(uri, "the port is not a number in 0..65535", expected) from None
    host = parts.netloc.rsplit("@", 1)[-1]  # no credentials in the probe (urllib cannot send them; none needed)
    health = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(health, timeout=REACHABILITY_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # any HTTP answer (even 401/404 behind a proxy) means a server is there; MLflow handles the rest
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return  # it answered; certificates are MLflow's business (MLFLOW_TRACKING_SERVER_CERT_PATH, ...)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            reason = f"no answer within {REACHABILITY_TIMEOUT_S:g} s"
        raise _unusable(
            uri,
            f"the tracking server is unreachable (GET {health}: {reason})",
            "Start the server (`mlflow server --host <host> --port <port>`) or fix the host or port",
        ) from None


def _check_sqlite(uri: str) -> None:
    rest = uri.split(":", 1)[1]
    if not rest.startswith("///"):
        if rest in ("", "//"):
            return  # in-memory database
        raise _unusable(uri, "an SQLite URI needs three slashes before the file path",
                        "Expected sqlite:///relative/path.db or sqlite:////absolute/path.db")
    raw = rest[3:].split("?", 1)[0]
    if raw in ("", ":memory:"):
        return
    path = Path(urllib.parse.unquote(raw)).expanduser()
    folder = path.parent
    if not folder.is_dir():
        raise _unusable(uri, f"the folder {folder.absolute()} of the SQLite file does not exist",
                        "Create the folder or fix the path")
    if path.is_dir():
        raise _unusable(uri, f"{path.absolute()} is a folder, not an SQLite file", "Fix the path")
    if path.is_file():
        try:
            with open(path, "rb") as f:
                header = f.read(len(_SQLITE_HEADER))
        except OSError as exc:
            raise _unusable(uri, f"cannot read {path.absolute()} ({exc.strerror})", "Fix its permissions") from None
        if header and header != _SQLITE_HEADER:
            raise _unusable(uri, f"{path.absolute()} is not an SQLite database",
                            "Point it at an MLflow SQLite store or at a new file")
    elif not os.access(folder, os.W_OK):
        raise _unusable(uri, f"the folder {folder.absolute()} is not writable, so the SQLite file cannot be "
                        f"created there", "Use a writable folder")


def check_tracking_uri(uri: str) -> None:
    """Raise ConfigError naming the URI and what to do when MLflow cannot use it, before MLflow is called.

    Checks the scheme against MLflow's tracking stores; for http(s), that the server answers `GET /health` within
    `REACHABILITY_TIMEOUT_S` (MLflow itself would retry for minutes); for SQLite, that the file's folder exists
    and the file, when present, is an SQLite database (MLflow would create missing folders or retry for long).
    Other schemes (databases, Databricks, plugins) are left to MLflow. A URI that passed is not checked again.
    """
    if uri in _checked_uris:
        return
    try:
        scheme = urllib.parse.urlsplit(uri).scheme.lower()
    except ValueError as exc:  # e.g. an unclosed [ in an IPv6 host
        raise _unusable(uri, f"not a valid URI ({exc})", "Fix the URI") from None
    if len(scheme) == 1 and scheme.isalpha():
        scheme = ""  # a Windows drive letter: a local path
    engine = scheme.split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    if engine not in _known_schemes():
        raise _unusable(uri, f"unsupported scheme {scheme + ':'!r}",
                        "Expected sqlite:///<file>.db, http(s)://<host>:<port> of an MLflow tracking server, a "
                        "database URL (postgresql://, mysql://, mssql://) or a local folder; fix the URI")
    if engine in ("http", "https"):
        _check_http(uri)
    elif engine == "sqlite":
        _check_sqlite(uri)
    _checked_uris.add(uri)


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


def describe(text: str) -> None:
    """The active run's description in the MLflow UI (`mlflow.note.content`): one line with its key result."""
    mlflow.set_tag(tag.NOTE, text)


def param_text(value: Any) -> str:
    """An option's value as an MLflow param, the same whether carsml or `mlflow run -P` logs it: None (unset) is the
    empty string, booleans are `true` / `false` (as in the MLproject and on the command line)."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def log_params(params: Mapping[str, Any]) -> None:
    """Log params (`param_text`), skipping keys the run already holds (`mlflow run` pre-logs every -P value as a
    string, and re-logging a key with another representation raises)."""
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params if run else {}
    fresh = {k: param_text(v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


_STEPS_OF: str | None = None  # the run whose entry points' runs nest under it (steps_of)
_STEP_RUNS: list[str] = []  # the runs started as its children, in order


@contextlib.contextmanager
def steps_of(parent_run_id: str) -> Iterator[list[str]]:
    """Within the block, an entry point started while run `parent_run_id` is active becomes its child run; yields
    the list of those child runs' ids, in the order they started."""
    global _STEPS_OF, _STEP_RUNS
    previous = _STEPS_OF, _STEP_RUNS
    _STEPS_OF, _STEP_RUNS = parent_run_id, []
    try:
        yield _STEP_RUNS
    finally:
        _STEPS_OF, _STEP_RUNS = previous


EXPERIMENT_KIND = "mlflow.experimentKind"  # the MLflow 3 UI opens an experiment on its runs or on GenAI traces


def mark_ml_experiment(experiment_id: str) -> None:
    """Tag the experiment as model development (once), so the MLflow UI opens it on its runs table, not on the
    GenAI traces view that MLflow 3 shows an untagged experiment with."""
    client = MlflowClient()
    if EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, "custom_model_development")


@contextlib.contextmanager
def start_run(
    entry_point: str,
    cfg: dict[str, Any],
    *,
    run_name: str | None = None,
    nested: bool = False,
    resume_run_id: str = "",
    tags: dict[str, str] | None = None,
    parent_run_id: str = "",
) -> Iterator[mlflow.ActiveRun]:
    """Start (or join, or resume) the run for an entry point; log config, tags, and end it FAILED on error.

    Inside `steps_of(parent)` (the study), an entry point's own run is a child of that parent. `parent_run_id`: a
    child of that run, started in another process than the parent's (k-fold's parallel folds)."""
    setup_tracking()
    system = bool(cfg.get("system_metrics", False))  # training runs: CPU / GPU / memory as system/* metrics
    active_now = mlflow.active_run()
    is_step = _STEPS_OF is not None and active_now is not None and active_now.info.run_id == _STEPS_OF
    nested = nested or is_step or bool(parent_run_id)
    launched_run = os.environ.get("MLFLOW_RUN_ID") if not nested else None
    if launched_run and mlflow.active_run() is None and resume_run_id and resume_run_id != launched_run:
        # `mlflow run -P resume_run_id=X` created a fresh run; continue X instead. The fresh run stays (`mlflow run`
        # ends it after this process: deleting it would fail that), empty, pointing at the run that continued.
        MlflowClient().set_tag(launched_run, tag.CONTINUED_IN, resume_run_id)
        os.environ.pop("MLFLOW_RUN_ID")
        launched_run = None
    if resume_run_id:
        resumed = MlflowClient().get_run(resume_run_id)  # raises a clear MlflowException for unknown ids
        if not nested:  # children created after a resume must land in the resumed run's experiment
            mlflow.set_experiment(experiment_id=resumed.info.experiment_id)
        active = mlflow.start_run(run_id=resume_run_id, nested=nested, log_system_metrics=system)
    elif parent_run_id and active_now is None:
        mlflow.set_experiment(experiment_id=MlflowClient().get_run(parent_run_id).info.experiment_id)
        active = mlflow.start_run(run_name=run_name or entry_point, parent_run_id=parent_run_id,
                                  log_system_metrics=system)
    elif launched_run or nested:
        active = mlflow.start_run(run_name=run_name or entry_point, nested=nested, log_system_metrics=system)
    else:
        mlflow.set_experiment(cfg.get("experiment_name") or "stanford-cars")
        active = mlflow.start_run(run_name=run_name or entry_point, log_system_metrics=system)
    with active:
        if is_step:
            _STEP_RUNS.append(active.info.run_id)
        mark_ml_experiment(active.info.experiment_id)
        info = git_info()
        base_tags = {tag.ENTRY_POINT: entry_point, tag.VERSION: carsml.__version__}
        if info:
            base_tags[tag.GIT_COMMIT] = info["commit"]
            base_tags[tag.GIT_DIRTY] = info["dirty"]
            if "mlflow.source.git.commit" not in active.data.tags:
                base_tags["mlflow.source.git.commit"] = info["commit"]
        if not launched_run and not resume_run_id and run_name:
            base_tags["mlflow.runName"] = run_name
        mlflow.set_tags({**base_tags, **(tags or {})})
        log_params({k: v for k, v in cfg.items() if k != "entry_point"})
        try:
            yield active
        except KeyboardInterrupt:
            mlflow.set_tag(tag.ERROR, "interrupted")
            mlflow.end_run("KILLED")
            raise
        except BaseException as exc:
            mlflow.set_tag(tag.ERROR, f"{type(exc).__name__}: {exc}"[:5000])
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
    mlflow.set_tags({tag.DATA_LAYOUT: dataset.layout, tag.DATA_DIGEST: dataset.digest(),
                     tag.DATA_ROOT: str(dataset.root), tag.NUM_CLASSES: str(dataset.num_classes)})


def _rows_digest(table: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(table, index=False).values.tobytes()).hexdigest()[:16]


def log_figure(fig: Any, artifact_file: str, run_id: str | None = None) -> None:
    """Log a matplotlib figure to the active run (or to run `run_id`, active or finished) and close it."""
    import matplotlib.pyplot as plt

    if run_id is None:
        mlflow.log_figure(fig, artifact_file)
    else:
        MlflowClient().log_figure(run_id, fig, artifact_file)
    plt.close(fig)


def log_files(paths: Iterable[Path], artifact_dir: str, run_id: str) -> None:
    """Log files under `artifact_dir` of run `run_id` (active or finished)."""
    client = MlflowClient()
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_dir)


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


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    """Log `metrics` (values as floats) to the active run, at `step` when given."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(run_tags: dict[str, Any]) -> None:
    """Set tags (values as strings) on the active run; name carsml's own through `carsml.tracking.tags`."""
    mlflow.set_tags({k: str(v) for k, v in run_tags.items()})


def set_tag(key: str, value: Any) -> None:
    """Set one tag (value as a string) on the active run."""
    mlflow.set_tag(key, str(value))


def active_run_id() -> str:
    """The id of the active run (RuntimeError outside one: a bug, never a user's mistake)."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run")
    return run.info.run_id


def in_run() -> bool:
    """Whether a run is active (code that also runs outside an entry point logs only inside one)."""
    return mlflow.active_run() is not None


def log_artifacts(folder: str | Path, artifact_path: str) -> None:
    """Every file of `folder` under `artifact_path` of the active run."""
    mlflow.log_artifacts(str(folder), artifact_path)


def launched_run_id() -> str:
    """The run `mlflow run` created for this process ("" outside `mlflow run`)."""
    return os.environ.get("MLFLOW_RUN_ID", "")


def adopt_children(from_run_id: str, to_run_id: str) -> int:
    """Make every child run of `from_run_id` a child of `to_run_id` (MLflow nests runs by the mlflow.parentRunId tag);
    returns how many moved."""
    client = MlflowClient()
    parent = client.get_run(from_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{from_run_id}'")
    for child in children:
        client.set_tag(child.info.run_id, "mlflow.parentRunId", to_run_id)
    return len(children)


def delete_run(run_id: str) -> None:
    """Mark run `run_id` deleted (MLflow keeps it recoverable until the store is garbage-collected)."""
    MlflowClient().delete_run(run_id)


def fail_run(run_id: str, reason: str) -> None:
    """End run `run_id` (not the active one: e.g. a killed worker's) as FAILED, recording `reason` as carsml.error."""
    client = MlflowClient()
    client.set_tag(run_id, tag.ERROR, reason[:5000])
    client.set_terminated(run_id, "FAILED")


def end_run(status: str) -> None:
    """End the active run with `status` (FINISHED, FAILED, KILLED) — only that run, not a parent."""
    mlflow.end_run(status)


def use_experiment_of(run: Any) -> None:
    """Make `run`'s experiment the active one (runs created next, nested ones too, land beside it)."""
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
