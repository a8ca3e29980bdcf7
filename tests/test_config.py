"""Experiment configs: YAML defaults, inheritance, overrides, and the generated MLproject."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from carsml import mlproject
from carsml.config import entry_points, load_config, options, parse_assignments
from carsml.errors import ConfigError
from carsml.options import FAMILIES, ModelOptions, TrainOptions
from tests.conftest import REPO


def test_study_defaults_come_from_yaml_with_inheritance() -> None:
    improved = load_config("improved")
    assert (improved["model"], improved["epochs"], improved["lr"]) == ("improved_cnn", 25, 0.0005)
    assert (improved["weight_decay"], improved["augmentation"], improved["scheduler"]) == (1e-4, "study", "plateau")
    baseline = load_config("baseline")
    assert (baseline["epochs"], baseline["augmentation"], baseline["batch_size"]) == (15, "none", 128)
    assert load_config("kfold_improved")["folds"] == 5
    assert load_config("kfold_improved")["epochs"] == 25  # inherited from improved
    assert load_config("data_analysis")["data"] == "synthetic"


def test_overrides_are_coerced_to_the_option_type() -> None:
    cfg = load_config("baseline", {"lr": "1e-3", "epochs": "3", "use_boxes": "false", "data": "/x"})
    assert cfg["lr"] == 1e-3 and cfg["epochs"] == 3 and cfg["use_boxes"] is False and cfg["data"] == "/x"
    assert load_config("baseline", {"epochs": "3.0"})["epochs"] == 3  # mlflow passes floats for numeric params


@pytest.mark.parametrize("overrides, fragment", [
    ({"lrr": 1}, "has no option 'lrr'"),
    ({"epochs": "ten"}, "'epochs': expected int"),
    ({"epochs": "2.5"}, "'epochs': expected int"),
    ({"use_boxes": "maybe"}, "'use_boxes': expected bool"),
])
def test_bad_overrides_name_the_option(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config("baseline", overrides)


def test_unknown_experiment_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="Known: .*baseline"):
        load_config("nope")


def test_every_option_has_help_text() -> None:
    for name in entry_points():
        missing = [k for k, opt in options(name).items() if not opt.help]
        assert not missing, f"{name}: options without a help comment: {missing}"


def test_parse_assignments() -> None:
    assert parse_assignments(["lr=0.1", "head-widths=8,4"]) == {"lr": "0.1", "head_widths": "8,4"}
    with pytest.raises(ConfigError):
        parse_assignments(["lr"])


def test_mlproject_is_generated_from_the_yaml_defaults() -> None:
    assert (REPO / "MLproject").read_text() == mlproject.render(), "run `python -m carsml.mlproject`"
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    commands = mlproject.entry_point_commands()
    assert set(commands) == set(entry_points())  # every defaults file is an entry point
    for entry, command in commands.items():
        point = spec["entry_points"][entry]
        assert set(point["parameters"]) == set(options(entry))
        for key in options(entry):  # every parameter is passed explicitly, dashed for Typer
            assert f"--{key.replace('_', '-')} {{{key}}}" in point["command"]
        assert point["command"].startswith(f"carsml {command} ")


def test_every_option_belongs_to_exactly_one_typed_family_and_the_yaml_holds_its_only_default() -> None:
    for entry in [*entry_points(), "_data", "_source", "_train"]:
        fields = [f.name for family in FAMILIES[entry].values() for f in dataclasses.fields(family)]
        assert len(fields) == len(set(fields)), f"{entry}: an option in two families"
        assert set(fields) == set(options(entry)), entry  # options() also raises on a mismatch
        for family in FAMILIES[entry].values():  # no default in Python: the YAML is the only copy
            assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(family)), family


def test_options_are_frozen_families_and_a_read_only_flat_mapping() -> None:
    cfg = load_config("transfer", {"epochs": "3", "head_lr": "0.01"})
    assert isinstance(cfg.train, TrainOptions) and isinstance(cfg.model, ModelOptions)
    assert (cfg.train.epochs, cfg.transfer.head_lr, cfg["epochs"], cfg["entry_point"]) == (3, 0.01, 3, "transfer")
    assert dict(cfg)["head_lr"] == 0.01 and len(dict(cfg)) == len(options("transfer")) + 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg["epochs"] = 4  # type: ignore[index]
    changed = cfg.replace(epochs="7")
    assert (changed.train.epochs, cfg.train.epochs) == (7, 3)  # re-coerced; the original is unchanged
    with pytest.raises(AttributeError, match="no option family 'tune'"):
        _ = cfg.tune


@pytest.mark.parametrize("entry, key", [("baseline", "dropout"), ("baseline", "max_classes"),
                                        ("baseline", "resume_run_id"), ("errors", "image_size"),
                                        ("errors", "use_boxes"), ("new_category", "epochs"), ("tune", "timeout"),
                                        ("features_rf", "max_depth")])
def test_unset_is_none_and_the_empty_string_unsets(entry: str, key: str) -> None:
    assert load_config(entry)[key] is None  # no magic -1 / 0 / "" values
    assert load_config(entry, {key: ""})[key] is None  # the CLI's and `mlflow run -P key=`'s spelling
    assert load_config(entry, {key: "''"})[key] is None  # as `mlflow run` logs an empty parameter


def test_an_option_that_cannot_be_unset_says_so_and_choices_are_checked_once() -> None:
    with pytest.raises(ConfigError, match="'epochs': expected int; got ''"):
        load_config("baseline", {"epochs": ""})
    with pytest.raises(ConfigError, match="'optimizer': expected one of adam, adamw, sgd; got 'rmsprop'"):
        load_config("baseline", {"optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="'aggregation': expected one of mean, vote"):
        load_config("tta", {"aggregation": "max"})
    assert load_config("errors", {"use_boxes": "false"})["use_boxes"] is False
