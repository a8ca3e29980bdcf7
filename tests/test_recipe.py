"""Named training recipes (`recipe=carsml`) and the refit on every training image (`refit_run_id`)."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from carsml.cli import run_experiment
from carsml.config import load_config, options, recipe_values
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments.train import smoothed, within_noise
from carsml.tracking.epochs import epoch_key
from tests.conftest import TINY

# a selection run the refit can follow: the recipe with a schedule short enough for TINY's few epochs
SELECT = {**TINY, "recipe": "carsml", "epochs": 3, "warmup_epochs": 0, "batch_size": 16}


def _runs() -> list[mlflow.entities.Run]:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("entry", ["improved", "kfold_improved", "transfer", "tune"])
def test_the_recipe_sets_the_defaults_and_explicit_options_win(entry: str) -> None:
    recipe = recipe_values("carsml")
    cfg = load_config(entry, {"recipe": "carsml", "lr": 0.01})
    opts = options(entry)
    for key, value in recipe.items():
        if key in opts and key != "lr":
            assert cfg[key] == value, key
    assert cfg["lr"] == 0.01  # set explicitly
    assert load_config(entry, {"recipe": "carsml", "warmup_epochs": 0})["warmup_epochs"] == 0  # also to a default
    study = load_config(entry)
    # (`amp` aside: CARSML_TEST_VARIANT may change its default for the whole suite, tests/conftest.py)
    assert study["recipe"] == "study" and all(study[k] == opts[k].default for k in opts if k != "amp")


def test_mlflow_run_passes_every_parameter_so_only_changed_values_count_as_set() -> None:
    defaults = {key: opt.default for key, opt in options("improved").items()}
    cfg = load_config("improved", {**defaults, "recipe": "carsml", "lr": 0.01}, passes_defaults=True)
    assert cfg["augmentation"] == "crop" and cfg["optimizer"] == "adamw" and cfg["lr"] == 0.01


def test_unknown_recipe_is_refused_before_a_run() -> None:
    with pytest.raises(ConfigError, match="recipe: expected one of study, carsml, finetune; got 'fast'"):
        run_experiment("improved", {**TINY, "recipe": "fast"})
    assert _runs() == []


def test_the_refit_budget_is_the_last_epoch_within_noise_of_the_best_validation_accuracy() -> None:
    # 100 validation images, best 0.5: one standard error is 0.05, so epoch 3 (0.46) is within it and epoch 4 is not
    assert within_noise({1: 0.2, 2: 0.5, 3: 0.46, 4: 0.44}, 100) == 3
    assert within_noise({1: 0.2, 2: 0.5, 3: 0.3}, 100) == 2  # over-trained: the best epoch itself
    assert within_noise({1: 0.2, 2: 0.5, 3: 0.3}, 4) == 3  # 4 images cannot tell 0.5 from 0.3 (margin 0.25)
    assert within_noise({1: 1.0, 2: 1.0, 3: 0.99}, 1000) == 2  # a perfect score has no noise band: the last perfect


def test_one_lucky_epoch_does_not_cut_the_refit_short() -> None:
    # 116 validation images; epoch 22 is 5 images above its neighbours (a seed of improved_cnn on the real dev set)
    curve = {20: 0.38, 21: 0.38, 22: 0.43, 23: 0.37, 24: 0.38, 25: 0.38}
    assert within_noise(curve, 116) == 22  # the raw band, 0.43 - 0.046, lies above every later epoch
    assert smoothed(curve) == pytest.approx({20: 0.38, 21: 0.3967, 22: 0.3933, 23: 0.3933, 24: 0.3767, 25: 0.38},
                                            abs=1e-4)
    assert within_noise(smoothed(curve), 116) == 25
    over_trained = {1: 0.2, 2: 0.4, 3: 0.5, 4: 0.5, 5: 0.3, 6: 0.2, 7: 0.2}
    assert within_noise(smoothed(over_trained), 100) == 4  # a real decline still ends the budget


def test_refit_trains_on_every_training_image_for_the_chosen_epochs() -> None:
    run_experiment("improved", SELECT)
    (selection,) = _runs()
    curve = {m.step: m.value for m in MlflowClient().get_metric_history(selection.info.run_id, "val_acc")}
    membership = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=selection.info.run_id,
                                                                 artifact_path="data/split_membership.csv"))
    best_epoch = within_noise(smoothed(curve), int((membership["role"] == "val").sum()))
    assert best_epoch >= int(selection.data.metrics["best_epoch"])
    refit = run_experiment("improved", {"refit_run_id": selection.info.run_id})
    run = next(r for r in _runs() if r.info.run_id != selection.info.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "improved-improved_cnn-refit"
    assert run.data.tags["carsml.selection_run_id"] == selection.info.run_id
    assert run.data.params["epochs"] == str(best_epoch) and run.data.params["recipe"] == "carsml"
    assert {k: v for k, v in run.data.params.items() if k not in ("epochs", "refit_run_id")} == {
        k: v for k, v in selection.data.params.items() if k not in ("epochs", "refit_run_id")}
    # every official training image trains, none is held out; nothing was selected on validation
    members = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                              artifact_path="data/split_membership.csv"))
    chosen = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=selection.info.run_id,
                                                             artifact_path="data/split_membership.csv"))
    assert set(members["role"]) == {"train"} and sorted(members["fname"]) == sorted(chosen["fname"])
    assert "best_val_acc" not in run.data.metrics and "val_acc" not in run.data.metrics
    assert refit.fit.epochs_run == best_epoch and "test_acc" in run.data.metrics and refit.model_uri
    # the test split is evaluated once, after training: no per-epoch test curve to choose an epoch by
    assert MlflowClient().get_metric_history(run.info.run_id, epoch_key("test_acc")) == []
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train_loss")] == \
        list(range(1, best_epoch + 1))


def test_refit_refuses_what_it_cannot_follow() -> None:
    with pytest.raises(CarsmlError, match="refit_run_id='0123456789abcdef': no such MLflow run"):
        run_experiment("improved", {"refit_run_id": "0123456789abcdef"})
    run_experiment("baseline", {**TINY, "epochs": 1, "log_model": False})  # selects with scheduler none: fine
    (baseline,) = _runs()
    with pytest.raises(ConfigError, match="is a 'baseline' run, not 'improved'"):
        run_experiment("improved", {"refit_run_id": baseline.info.run_id})
    run_experiment("improved", {**TINY, "epochs": 1, "log_model": False})  # the study's plateau schedule
    plateau = next(r for r in _runs() if r.info.run_id != baseline.info.run_id)
    with pytest.raises(ConfigError, match="no validation split to drive scheduler='plateau'"):
        run_experiment("improved", {"refit_run_id": plateau.info.run_id})
    MlflowClient().set_terminated(baseline.info.run_id, "FAILED")
    with pytest.raises(ConfigError, match="needs a FINISHED selection run"):
        run_experiment("baseline", {"refit_run_id": baseline.info.run_id})
    assert len(_runs()) == 2  # nothing was started by the refused refits
