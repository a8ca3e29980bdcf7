"""A training run's resume checkpoints, reachable from the run itself when the runs live on a tracking server.

With a local store the checkpoints stay in the local cache folder the run's `carsml.checkpoint_dir` tag names. With a
tracking server (an http(s) URI) the machine that resumes may not be the one that was killed, so every epoch's
`last.pt` (and `best.pt` when it changed) is also logged as the run's artifacts `checkpoints/`, through the server's
artifact proxy; `fetch_checkpoints` brings them back into a local folder before a resume. A finished run's checkpoint
artifacts are deleted with its local checkpoints unless `keep_checkpoints`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from carsml.engine.callbacks import Callback
from carsml.engine.checkpoint import BEST_NAME, LAST_NAME
from carsml.errors import CarsmlError

ARTIFACT_DIR = "checkpoints"


def shares_checkpoints() -> bool:
    """Whether checkpoints are logged as artifacts: the tracking store is a server (http or https)."""
    return urlparse(mlflow.get_tracking_uri()).scheme in ("http", "https")


class CheckpointArtifacts(Callback):
    """Logs the engine's checkpoints of each epoch as artifacts of `run_id`. Listed before the metrics callback, so an
    epoch's metrics reach the run only after the checkpoint that continues after it."""

    def __init__(self, run_id: str, folder: Path) -> None:
        self.run_id, self.folder = run_id, Path(folder)
        self.sent: dict[str, int] = {}  # file name -> mtime_ns of the copy on the server
        self.client = MlflowClient()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        for name in (BEST_NAME, LAST_NAME):  # best first: last.pt on the server never points past best.pt
            path = self.folder / name
            if path.is_file() and self.sent.get(name) != path.stat().st_mtime_ns:
                self.client.log_artifact(self.run_id, str(path), ARTIFACT_DIR)
                self.sent[name] = path.stat().st_mtime_ns


def check_artifacts_reachable(run_id: str) -> None:
    """CarsmlError when run `run_id` lives on a tracking server that does not proxy artifacts and its artifacts lie in
    a folder of the server's machine that this machine cannot see (`mlflow server --no-serve-artifacts` with a local
    artifact root): its checkpoints could only be resumed on the machine that was killed."""
    if not shares_checkpoints():
        return
    uri = MlflowClient().get_run(run_id).info.artifact_uri
    parsed = urlparse(uri)
    local = Path(parsed.path if parsed.scheme == "file" else uri) if parsed.scheme in ("", "file") else None
    if local is not None and not local.exists():
        raise CarsmlError(f"run {run_id}: its artifacts (and the checkpoints to resume from) are in {uri}, a folder on "
                          f"the tracking server's machine that this machine cannot see: {mlflow.get_tracking_uri()} "
                          f"does not proxy artifacts. Start the server with `--artifacts-destination DIR "
                          f"--serve-artifacts` (docs/tracking.md), mount that folder here at the same path, or resume "
                          f"on the machine whose local checkpoints are still there")


def fetch_checkpoints(run_id: str, folder: Path) -> bool:
    """Make `folder` hold run `run_id`'s checkpoints: True when it has `last.pt` already or it was downloaded from the
    run's `checkpoints/` artifacts; False when the run has none."""
    folder = Path(folder)
    if (folder / LAST_NAME).is_file():
        return True
    check_artifacts_reachable(run_id)
    try:
        names = {Path(a.path).name for a in MlflowClient().list_artifacts(run_id, ARTIFACT_DIR)}
    except MlflowException:
        return False
    if LAST_NAME not in names:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for name in sorted(names & {BEST_NAME, LAST_NAME}):
            download_artifacts(run_id=run_id, artifact_path=f"{ARTIFACT_DIR}/{name}", dst_path=str(folder))
    except MlflowException as exc:
        raise CarsmlError(f"run {run_id}: its checkpoints could not be downloaded from "
                          f"{mlflow.get_tracking_uri()} ({exc}); the server must proxy artifacts "
                          "(`mlflow server --serve-artifacts`, docs/tracking.md)") from None
    for name in names & {BEST_NAME, LAST_NAME}:  # download_artifacts keeps the artifact's folder
        nested = folder / ARTIFACT_DIR / name
        if nested.is_file():
            nested.replace(folder / name)
    if (folder / ARTIFACT_DIR).is_dir() and not any((folder / ARTIFACT_DIR).iterdir()):
        (folder / ARTIFACT_DIR).rmdir()
    return (folder / LAST_NAME).is_file()


def drop_checkpoints(run_id: str) -> None:
    """Delete run `run_id`'s checkpoint artifacts (a finished run keeps only its model)."""
    if not shares_checkpoints():
        return
    run = MlflowClient().get_run(run_id)
    if any(Path(a.path).name in (BEST_NAME, LAST_NAME) for a in MlflowClient().list_artifacts(run_id, ARTIFACT_DIR)):
        get_artifact_repository(run.info.artifact_uri).delete_artifacts(ARTIFACT_DIR)
