"""Model registry helpers: idempotent registration of LoggedModels and alias-based promotion.

Registry stages are deprecated in MLflow; carsml uses aliases only (`models:/carsml-resnet50@champion`). A version is
identified by the model URI it was registered from (`models:/m-...`), so registering the same logged model twice
returns the existing version instead of adding a duplicate.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from carsml.errors import CarsmlError
from carsml.tracking.runs import library_log_level

CHAMPION = "champion"
MODEL_URI_TAG = "model_uri"  # tag on every carsml version: the logged model it was registered from
SCORE_TAG = "val_acc"  # tag the champion comparison reads (validation accuracy; never test)
READY_TIMEOUT_S = 120  # seconds a remote registry may take to make a version READY


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def model_exists(client: MlflowClient, name: str) -> bool:
    """Whether registered model `name` exists."""
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            return False
        raise
    return True


def find_version(client: MlflowClient, name: str, model_uri: str) -> ModelVersion | None:
    """The version of `name` registered from `model_uri` (by its source or carsml's model_uri tag), if any."""
    if not model_exists(client, name):
        return None
    escaped = name.replace("'", "\\'")
    for version in client.search_model_versions(f"name = '{escaped}'"):
        if version.source == model_uri or version.tags.get(MODEL_URI_TAG) == model_uri:
            return version
    return None


def check_logged_model(model_uri: str) -> None:
    """CarsmlError unless `model_uri` (a `models:/m-<id>` URI of a LoggedModel) exists in the tracking store."""
    model_id = model_uri.removeprefix("models:/")
    if not model_id.startswith("m-") or "/" in model_id or "@" in model_id:
        raise CarsmlError(f"{model_uri!r} is not the URI of a logged model (models:/m-<id>)")
    try:
        MlflowClient().get_logged_model(model_id)
    except MlflowException as exc:
        raise CarsmlError(f"logged model {model_uri} not found at tracking URI {mlflow.get_tracking_uri()} "
                          f"({exc.message})") from None


REGISTRATION_NOTES = ("Successfully registered model", "Created version", "Registered model")


@contextlib.contextmanager
def _without_registration_notes() -> Iterator[None]:
    """`mlflow.register_model` prints its progress on stderr ("Successfully registered model 'x'.", "Created version
    '1' of model 'x'."); under the commands' quiet default those lines are dropped (promote says what it registered)
    and anything else MLflow writes there is passed on."""
    if library_log_level() <= logging.INFO:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        sys.stderr.write("".join(line for line in buffer.getvalue().splitlines(keepends=True)
                                 if not line.startswith(REGISTRATION_NOTES)))


def register(name: str, model_uri: str, tags: dict[str, str], description: str = "") -> tuple[ModelVersion, bool]:
    """Register `model_uri` as a version of `name` (created when missing) with `tags`; returns (version, created).

    When a version of `name` was already registered from `model_uri`, that version is returned unchanged.
    `mlflow.register_model` also links the version to its LoggedModel (shown on the model's page in the UI).
    """
    client = MlflowClient()
    existing = find_version(client, name, model_uri)
    if existing is not None:
        return existing, False
    new_model = not model_exists(client, name)
    with _without_registration_notes():
        version = mlflow.register_model(model_uri, name, tags={**tags, MODEL_URI_TAG: model_uri},
                                        await_registration_for=READY_TIMEOUT_S)
    if new_model and description:
        client.update_registered_model(name, description=description)
    if version.status != "READY":
        raise CarsmlError(f"model {name} version {version.version} is {version.status} "
                          f"({version.status_message or 'no message'})")
    return version, True


def alias_version(client: MlflowClient, name: str, alias: str = CHAMPION) -> ModelVersion | None:
    """The version `alias` points at, or None (no such model or alias)."""
    if not model_exists(client, name):
        return None
    version = client.get_registered_model(name).aliases.get(alias)
    return client.get_model_version(name, str(version)) if version is not None else None


def score(version: ModelVersion) -> float | None:
    """The validation accuracy a version was registered with (its `val_acc` tag), or None."""
    try:
        value = float(version.tags[SCORE_TAG])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class AliasDecision:
    """Whether `alias` moved to `version`, and why."""

    moved: bool
    previous: str | None  # the version the alias pointed at before (None: unset)
    reason: str


def promote(name: str, version: ModelVersion, *, force: bool = False, alias: str = CHAMPION) -> AliasDecision:
    """Point `alias` at `version` when it beats the current holder on validation accuracy (or with `force`).

    Ties keep the current holder; a holder without a readable `val_acc` tag is only replaced with `force`.
    """
    client = MlflowClient()
    current = alias_version(client, name, alias)
    previous = str(current.version) if current is not None else None
    if current is not None and str(current.version) == str(version.version):
        return AliasDecision(False, previous, f"{alias} already points at version {version.version}")
    new, old = score(version), score(current) if current is not None else None
    if force:
        reason = "forced"
    elif current is None:
        reason = f"no {alias} yet"
    elif new is None:
        return AliasDecision(False, previous, f"version {version.version} has no {SCORE_TAG} tag to compare")
    elif old is None:
        return AliasDecision(False, previous, f"{alias} (version {previous}) has no {SCORE_TAG} tag; use force "
                                              f"to replace it")
    elif new > old:
        reason = f"{SCORE_TAG} {new:.4f} beats {old:.4f} of version {previous}"
    else:
        return AliasDecision(False, previous, f"{SCORE_TAG} {new:.4f} does not beat {old:.4f} of version "
                                              f"{previous}")
    client.set_registered_model_alias(name, alias, str(version.version))
    return AliasDecision(True, previous, reason)
