"""promote: the best resnet50 transfer run by validation accuracy and its RandomForest head go to the registry, alias
`champion` moves only for a better validation accuracy (or `force`), a second promote changes nothing, and bad
situations (no resnet50 run, no RF head) fail clearly without touching the registry.

The runs come from the real `transfer` and `features_rf` entry points on a tiny, easy dataset (four colours), trained
once per module; each test works on its own copy of the tracking database, so registry changes stay in the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from carsml.cli import run_experiment
from carsml.errors import CarsmlError, ConfigError
from carsml.tracking import registry
from carsml.tracking.models import resolve_model_uri
from carsml.tracking.runs import start_run
from tests.test_mlflow_run import mlflow_run

COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40))
# resnet50 from scratch at 32 px learns four colours in one epoch (val acc 1.0); lr 1e-7 learns nothing (0.25)
TRANSFER = {"image_size": 32, "epochs": 1, "batch_size": 8, "device": "cpu", "pretrained": False}
FEATURES_RF = {"n_estimators": 10, "n_jobs": 1, "device": "cpu", "batch_size": 32}
NET, RF = "carsml-resnet50", "carsml-resnet50-rf"


def write_colour_dataset(root: Path, train_per_class: int = 12, test_per_class: int = 4, seed: int = 0) -> Path:
    """Class folders of noisy single-colour JPEGs: a dataset any network learns in an epoch."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, colour in enumerate(COLOURS):
            folder = root / split / f"colour_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{label}_{i}.jpg", quality=90)
    return root


@contextlib.contextmanager
def tracking_env(uri: str, folder: Path, cache_dir: Path) -> Iterator[None]:
    """For a module-wide fixture: MLflow at `uri`, cwd `folder`; afterwards everything is restored, including the
    MLFLOW_EXPERIMENT_ID that mlflow.set_experiment exports into the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARSML_CACHE", str(cache_dir))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.chdir(folder)
        try:
            yield
        finally:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def build_store(folder: Path, cache_dir: Path, *, weak_run: bool, uri: str | None = None) -> dict[str, Any]:
    """A tracking store (`uri`, default a SQLite file in `folder`) with a good resnet50 transfer run and its
    features_rf run (plus, with `weak_run`, a worse transfer run without an RF head). Returns the store URI, folder
    and run ids."""
    data = write_colour_dataset(folder / "colours")
    uri = uri or f"sqlite:///{folder}/mlflow.db"
    with tracking_env(uri, folder, cache_dir):
        good = run_experiment("transfer", {**TRANSFER, "data": str(data), "lr": 1e-3})
        ids = {"good": mlflow.last_active_run().info.run_id}
        if weak_run:
            weak = run_experiment("transfer", {**TRANSFER, "data": str(data), "lr": 1e-7})
            ids["weak"] = mlflow.last_active_run().info.run_id
            assert weak.finals["best_val_acc"] < good.finals["best_val_acc"], "the fixture needs a worse run"
        ids["rf"] = run_experiment("features_rf", {**FEATURES_RF, "run_id": ids["good"]}).run_id
    return {"uri": uri, "folder": folder, "data": data, **ids}


@pytest.fixture(scope="module")
def source_store(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    return build_store(tmp_path_factory.mktemp("promote-store"), cache_dir, weak_run=True)


@pytest.fixture
def store(source_store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The module's runs in a private copy of the tracking database (artifacts are read from the original)."""
    shutil.copy(source_store["folder"] / "mlflow.db", tmp_path / "registry.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/registry.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/registry.db")
    return source_store


def registry_state() -> dict[str, Any]:
    """Everything promote may change: every version with its tags, and every model's aliases."""
    client = MlflowClient()
    return {m.name: {"aliases": dict(m.aliases),
                     "versions": sorted((v.version, v.source, v.run_id, tuple(sorted(v.tags.items())))
                                        for v in client.search_model_versions(f"name = '{m.name}'"))}
            for m in client.search_registered_models()}


def champion_of(name: str) -> str:
    return str(MlflowClient().get_model_version_by_alias(name, "champion").version)


def promote_runs() -> list[mlflow.entities.Run]:
    return MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "tags.`carsml.entry_point` = 'promote'")


def test_promote_registers_the_best_run_and_its_rf_head_and_a_second_promote_changes_nothing(
        store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    good, rf_run = client.get_run(store["good"]), client.get_run(store["rf"])
    result = run_experiment("promote", {})
    assert (result.version, result.rf_version, result.created, result.rf_created) == ("1", "1", True, True)
    assert result.champion.moved and result.rf_champion.moved
    net = client.get_model_version_by_alias(NET, "champion")
    assert net.source == good.data.tags["carsml.model_uri"] and net.run_id == good.info.run_id
    assert net.tags["source_run_id"] == good.info.run_id
    assert float(net.tags["val_acc"]) == good.data.metrics["best_val_acc"]
    assert float(net.tags["test_acc"]) == good.data.metrics["test_acc"]
    assert net.tags["data_digest"] == good.data.tags["carsml.data_digest"] and net.tags["num_classes"] == "4"
    rf = client.get_model_version_by_alias(RF, "champion")
    assert rf.source == rf_run.data.tags["carsml.rf_model_uri"]
    assert (rf.tags["source_run_id"], rf.tags["backbone_run_id"]) == (rf_run.info.run_id, good.info.run_id)
    assert (rf.tags["backbone_model"], rf.tags["backbone_version"]) == (NET, str(net.version))
    assert float(rf.tags["val_acc"]) == rf_run.data.metrics["rf_val_acc"]
    assert float(rf.tags["test_acc"]) == rf_run.data.metrics["rf_test_acc"]
    assert rf.tags["rf_head_uri"] == rf_run.data.tags["carsml.rf_head_uri"]
    assert "champion" in client.get_registered_model(NET).description
    before = registry_state()

    # the same promotion again, the way users run it: nothing in the registry changes
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # set by mlflow.set_experiment in this process
    done = mlflow_run("promote", {}, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already registered" in done.stdout
    assert registry_state() == before
    assert [r.info.status for r in promote_runs()] == ["FINISHED", "FINISHED"]


def test_selection_uses_validation_accuracy_never_test(store: dict[str, Any]) -> None:
    client = MlflowClient()
    # make the weak run look far better on TEST: promote must still pick the better validation run
    client.log_metric(store["weak"], "test_acc", 1.0, step=99)
    client.log_metric(store["good"], "test_acc", 0.0, step=99)
    result = run_experiment("promote", {})
    assert result.source_run_id == store["good"]
    # and better on VALIDATION: now the weak run is the best, and it has no RF head
    client.log_metric(store["weak"], "best_val_acc", 2.0, step=99)
    with pytest.raises(CarsmlError, match=f"{store['weak']}.*has no finished features_rf run"):
        run_experiment("promote", {})


def test_champion_moves_only_for_a_better_validation_accuracy_or_with_force(store: dict[str, Any]) -> None:
    client = MlflowClient()
    weak = client.get_run(store["weak"])
    # an earlier, weaker resnet50 is the champion
    old, created = registry.register(NET, weak.data.tags["carsml.model_uri"],
                                     {"val_acc": repr(weak.data.metrics["best_val_acc"])})
    assert created and registry.promote(NET, old).moved
    result = run_experiment("promote", {})
    assert result.version == "2" and result.champion.moved and result.champion.previous == "1"
    assert "beats" in result.champion.reason
    assert champion_of(NET) == "2"
    # the weaker version does not win it back, unless forced
    decision = registry.promote(NET, client.get_model_version(NET, "1"))
    assert not decision.moved and "does not beat" in decision.reason
    assert champion_of(NET) == "2"
    assert registry.promote(NET, client.get_model_version(NET, "1"), force=True).moved
    assert champion_of(NET) == "1"
    # promote --force puts the best run back even though nothing is compared
    forced = run_experiment("promote", {"force": True})
    assert forced.champion.moved and forced.champion.reason == "forced" and not forced.created
    assert champion_of(NET) == "2"
    assert len(client.search_model_versions(f"name = '{NET}'")) == 2


def test_best_run_without_an_rf_head_is_an_error_and_registers_nothing(store: dict[str, Any]) -> None:
    MlflowClient().delete_run(store["rf"])
    with pytest.raises(CarsmlError, match=f"{store['good']}.*has no finished features_rf run.*features-rf"):
        run_experiment("promote", {})
    assert registry_state() == {} and MlflowClient().search_model_versions("") == []
    assert promote_runs() == []  # failed before a run was created


def test_no_resnet50_transfer_run_is_an_error_and_registers_nothing() -> None:
    with pytest.raises(CarsmlError, match="no MLflow experiment 'stanford-cars'"):
        run_experiment("promote", {})
    with start_run("transfer", {"model": "vgg16"}, tags={"carsml.model": "vgg16"}):
        mlflow.log_metric("best_val_acc", 0.9)  # a finished transfer run, but not a resnet50
    with pytest.raises(CarsmlError, match="no finished resnet50 `transfer` run"):
        run_experiment("promote", {})
    assert registry_state() == {} and promote_runs() == []


@pytest.mark.parametrize("overrides, fragment", [
    ({"model": " "}, "model: expected the architecture to promote"),
    ({"rf_model_name": NET}, "both 'carsml-resnet50'"),
])
def test_bad_model_names_fail_before_anything(overrides: dict[str, str], fragment: str, isolated: Path) -> None:
    with pytest.raises(ConfigError, match=fragment):
        run_experiment("promote", overrides)
    assert not (isolated / "mlflow.db").exists()  # the tracking store (and registry) was not even opened


def test_a_registry_alias_version_or_name_that_does_not_exist_is_one_clear_error(store: dict[str, Any]) -> None:
    """`models:/…@alias` (or `/version`) given to an analysis names what the registry does have, before any run."""
    run_experiment("promote", {})
    before = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    cases = {f"models:/{NET}@best": rf"{NET!r} has no alias 'best'; its aliases: @champion \(version 1\)",
             f"models:/{NET}/7": rf"{NET!r} has no version '7'",
             "models:/carsml-resnet5@champion": rf"no registered model 'carsml-resnet5' .*registered: {NET}, {RF}"}
    for uri, message in cases.items():
        with pytest.raises(CarsmlError, match=message):
            run_experiment("tta", {"run_id": uri})
    assert len(MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])) == \
        len(before)
    assert resolve_model_uri(f"models:/{NET}@champion") == f"models:/{NET}@champion"


def test_another_family_is_promoted_under_its_own_names_and_a_refit_wins_its_selection_runs_tie(
        store: dict[str, Any]) -> None:
    """`model=resnet18` promotes the best resnet18 (not the better-named resnet50s) as carsml-resnet18[-rf]; its refit,
    judged by the validation accuracy of the selection run that chose its epochs, is preferred to that run."""
    client = MlflowClient()
    select = run_experiment("transfer", {**TRANSFER, "model": "resnet18", "data": str(store["data"]), "lr": 1e-3})
    select_id = mlflow.last_active_run().info.run_id
    run_experiment("transfer", {"refit_run_id": select_id})
    refit_id = mlflow.last_active_run().info.run_id
    assert "best_val_acc" not in client.get_run(refit_id).data.metrics  # a refit has no validation split
    rf_id = run_experiment("features_rf", {**FEATURES_RF, "run_id": refit_id}).run_id
    result = run_experiment("promote", {"model": "resnet18"})
    assert (result.model_name, result.rf_model_name) == ("carsml-resnet18", "carsml-resnet18-rf")
    assert (result.source_run_id, result.rf_run_id) == (refit_id, rf_id)
    net = client.get_model_version_by_alias("carsml-resnet18", "champion")
    assert net.source == client.get_run(refit_id).data.tags["carsml.model_uri"]
    assert float(net.tags["val_acc"]) == select.finals["best_val_acc"] and net.tags["selection_run_id"] == select_id
    assert "resnet18 fine-tuned" in client.get_registered_model("carsml-resnet18").description
    assert NET not in {m.name for m in client.search_registered_models()}  # the resnet50 family was left alone


def test_registration_notes_are_quiet_unless_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    """MLflow's "Successfully registered model" / "Created version" lines (printed through its own stream) are
    dropped under the commands' quiet default; anything else it writes passes; --verbose shows them all."""
    from mlflow.utils.logging_utils import eprint

    from carsml.tracking.registry import _without_registration_notes
    from carsml.tracking.runs import quiet_mlflow

    try:
        for quiet in (True, False):
            quiet_mlflow(quiet)
            with _without_registration_notes():
                eprint("Successfully registered model 'carsml-x'.")
                eprint("Created version '1' of model 'carsml-x'.")
                eprint("WARNING something the user must see")
            err = capsys.readouterr().err
            assert "WARNING something the user must see" in err
            assert ("Created version" in err) is not quiet and ("Successfully registered" in err) is not quiet
    finally:
        quiet_mlflow(False)
