"""The `study` entry point: steps in the study's order as child runs of one parent, inputs found by lineage, the same
command again reuses every finished step, a killed k-fold step continues from its checkpoints, bad input stops before
any run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from carsml.cli import run_experiment
from carsml.config import load_config
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments import study
from carsml.experiments.study import (
    STEPS,
    parse_set,
    parse_steps,
    profile_values,
    profiles,
    run_step,
    step_options,
)
from carsml.tracking import tags as tag
from carsml.tracking.runs import start_run

TINY_STUDY = ("all.synth_classes=4,all.synth_images_per_class=16,all.image_size=32,kfold_improved.folds=2,"
              "kfold_improved.epochs=1,kfold_improved.head_widths=64,kfold_improved.batch_size=32,"
              "data_analysis.sample_images=2,data_analysis.image_stats_limit=10,errors.gallery=2")
STEPS_RUN = "errors,kfold_improved,data_analysis"  # given out of order: the study's order decides


def _runs() -> list[Any]:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def test_steps_run_in_the_study_order_and_unknown_steps_are_named() -> None:
    assert parse_steps("") == list(STEPS)
    assert parse_steps(STEPS_RUN) == ["data_analysis", "kfold_improved", "errors"]
    with pytest.raises(ConfigError, match="steps: unknown step.*kfold_improoved"):
        parse_steps("kfold_improoved")


@pytest.mark.parametrize("text, fragment", [
    ("kfold_improved.epochs", "expected step.option=value"),
    ("epochs=3", "expected step.option=value"),
    ("nope.epochs=3", "unknown step 'nope'"),
])
def test_bad_set_items_are_named(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_set(text)


def test_a_profile_that_does_not_exist_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="profile: expected one of demo, results, study; got 'fast'"):
        profile_values("fast")


@pytest.mark.parametrize("profile", profiles())
def test_every_shipped_profile_gives_every_step_valid_options(profile: str) -> None:
    shared = {"data": "synthetic", "cache_dir": None, "device": "cpu", "experiment_name": "x", "report_dir": "r"}
    for step in STEPS:  # unknown options, wrong types and bad choices raise here
        load_config(step, step_options(step, shared, profile_values(profile), {}))


def test_step_options_layer_defaults_profile_shared_options_and_set() -> None:
    cfg = {"data": "synthetic", "cache_dir": "", "device": "cpu", "experiment_name": "e", "report_dir": "r"}
    profile = {"all": {"image_size": 32, "views": 99}, "kfold_improved": {"epochs": 8, "device": "cuda"}}
    sets = parse_set("all.image_size=48,kfold_improved.epochs=2")
    opts = step_options("kfold_improved", cfg, profile, sets)
    assert opts["image_size"] == "48" and opts["epochs"] == "2"  # set wins over the profile
    assert opts["device"] == "cpu"  # the study's shared options win over the profile
    assert "views" not in opts  # `all` gives only options the step has
    assert step_options("tta", cfg, profile, {})["views"] == 99


def test_every_step_of_both_profiles_has_valid_options() -> None:
    cfg = {"data": "synthetic", "cache_dir": "", "device": "cpu", "experiment_name": "e", "report_dir": "r"}
    for name in ("demo", "study"):
        profile = profile_values(name)
        for step in STEPS:  # a step's run_id (from earlier steps) is checked when the step starts
            assert load_config(step, step_options(step, cfg, profile, {}))["entry_point"] == step


def test_a_bad_step_option_fails_before_any_run() -> None:
    before = len(_runs())
    with pytest.raises(ConfigError, match="has no option 'nope'"):
        run_experiment("study", {"steps": "kfold_improved", "set": "kfold_improved.nope=1"})
    assert len(_runs()) == before


def test_what_a_late_step_would_fail_on_stops_the_study_before_its_first_step(
        tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new class with no folder on real data, an empty folder, a model whose pretrained weights are nowhere, a
    dataset of annotations without images: one error each, before any run (not after the first steps' hours)."""
    real = tmp_path / "cars"
    for split in ("train", "test"):
        for name in ("Audi A", "BMW B"):
            (real / split / name).mkdir(parents=True)
            (real / split / name / "1.jpg").write_bytes(
                (shared_data / "sample" / "cars_train_bbox_cropped" / "00001.jpg").read_bytes())
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # resnet18's weights: not in this (empty) cache, no download
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    before = len(_runs())
    cases = (
        ({"data": str(real), "steps": "data_analysis,new_category"}, "new_category.folder: required when data is "
                                                                     "not 'synthetic'"),
        ({"steps": "new_category", "set": f"new_category.folder={tmp_path / 'empty'}"}, "is empty; expected images"),
        ({"steps": "transfer_all", "set": "transfer_all.models=resnet18,transfer_all.pretrained=true"},
         "study step transfer_all, model resnet18: pretrained weights for 'resnet18'"),
        ({"data": str(shared_data), "steps": "data_analysis"}, "annotations only, no images on disk"),
    )
    for options, fragment in cases:
        with pytest.raises(CarsmlError, match=fragment):
            run_experiment("study", {**options, "device": "cpu"})
    assert len(_runs()) == before


def test_a_step_needing_an_earlier_step_says_which() -> None:
    with pytest.raises(CarsmlError, match="step errors takes its input from this study's improved or kfold_improved "
                                          "step"):
        run_experiment("study", {"steps": "errors", "set": TINY_STUDY, "device": "cpu"})


@pytest.mark.slow
def test_the_study_runs_its_steps_as_children_and_again_reuses_every_one() -> None:
    first = run_experiment("study", {"steps": STEPS_RUN, "set": TINY_STUDY, "device": "cpu"})
    assert [s.name for s in first.steps] == ["data_analysis", "kfold_improved", "errors"]
    assert not any(s.reused for s in first.steps)
    client = MlflowClient()
    for step in first.steps:
        run = client.get_run(step.run_id)
        assert run.data.tags["mlflow.parentRunId"] == first.run_id
        assert run.data.tags[tag.ENTRY_POINT] == step.name and run.info.status == "FINISHED"
    kfold = client.get_run(first.steps[1].run_id)
    folds = [r for r in _runs() if r.data.tags.get("mlflow.parentRunId") == kfold.info.run_id]
    # the best fold by validation accuracy, ties to the lower validation loss
    best = min(folds, key=lambda r: (-r.data.metrics["best_val_acc"], r.data.metrics["best_val_loss"]))
    errors = client.get_run(first.steps[2].run_id)
    assert errors.data.tags[tag.SOURCE_RUN_ID] == best.info.run_id  # lineage: the best fold of this study
    before = {r.info.run_id for r in _runs()}

    again = run_experiment("study", {"steps": STEPS_RUN, "set": TINY_STUDY, "device": "cpu"})
    assert again.run_id == first.run_id  # the same study run continues
    assert all(s.reused for s in again.steps)
    assert [s.run_id for s in again.steps] == [s.run_id for s in first.steps]
    assert {r.info.run_id for r in _runs()} == before  # nothing new
    assert client.get_run(first.run_id).data.tags[tag.STEPS_REUSED] == "data_analysis,kfold_improved,errors"

    changed = TINY_STUDY.replace("errors.gallery=2", "errors.gallery=3")  # one step's option, added or changed
    third = run_experiment("study", {"steps": STEPS_RUN, "set": changed, "device": "cpu"})
    assert third.run_id == first.run_id  # still the same study: only the changed step runs again
    assert [s.action for s in third.steps] == ["reused", "reused", "ran"]
    assert third.steps[2].run_id != first.steps[2].run_id
    parent = client.get_run(first.run_id).data
    assert parent.tags[tag.STUDY_SET] == changed and parent.tags[tag.STEPS_REUSED] == "data_analysis,kfold_improved"


def test_a_killed_resumable_step_continues_and_other_unfinished_steps_are_replaced() -> None:
    seen: list[dict[str, Any]] = []

    def record(cfg: dict[str, Any]) -> None:
        seen.append(cfg)
        with start_run(cfg["entry_point"], cfg):
            pass

    given = {"synth_classes": 4, "folds": 2, "epochs": 1, "device": "cpu"}
    with start_run("study", {"profile": "demo"}, run_name="study") as parent:
        parent_id = parent.info.run_id
        with study.steps_of(parent_id) as started:
            cfg = load_config("kfold_improved", given)
            with pytest.raises(KeyboardInterrupt), start_run("kfold_improved", cfg):
                raise KeyboardInterrupt  # killed: the run ends KILLED
            killed = started[-1]
            step = run_step("kfold_improved", given, parent_id, {"kfold_improved": record}, started)
            assert seen[-1]["resume_run_id"] == killed and step.action == "resumed"
            analysis = load_config("data_analysis", {"sample_images": 2})
            with pytest.raises(KeyboardInterrupt), start_run("data_analysis", analysis):
                raise KeyboardInterrupt
            dropped = started[-1]
            run_step("data_analysis", {"sample_images": 2}, parent_id, {"data_analysis": record}, started)
            assert seen[-1]["sample_images"] == 2 and MlflowClient().get_run(dropped).info.lifecycle_stage == "deleted"


@pytest.mark.slow
def test_a_study_killed_mid_step_continues_that_step_without_duplicates(isolated: Path) -> None:
    """SIGKILL inside the second fold of kfold_improved, then the same command: the same step run continues (fold 0
    kept, fold 1 from its checkpoint), every epoch logged once."""
    epochs = 150
    args = [sys.executable, "-c", "from carsml.cli import main; main()", "study", "--steps", "kfold_improved",
            "--device", "cpu", "--set",
            TINY_STUDY.replace("kfold_improved.epochs=1", f"kfold_improved.epochs={epochs}")]
    log = isolated / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(args, cwd=isolated, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while log.read_text().count("\nepoch ") < epochs + 10 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the study ended before it could be killed mid-step: " + log.read_text()[-2000:]
        first.send_signal(signal.SIGKILL)
        first.wait()
    (killed_step,) = [r for r in _runs() if r.data.tags.get(tag.ENTRY_POINT) == "kfold_improved"
                      and r.data.tags.get(tag.FOLD) is None]
    done_fold = [r for r in _runs() if r.data.tags.get(tag.FOLD) == "0"]
    again = subprocess.run(args, cwd=isolated, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"study step kfold_improved  resumed  run {killed_step.info.run_id}" in again.stdout
    runs = _runs()
    assert len([r for r in runs if r.data.tags.get(tag.ENTRY_POINT) == "study"]) == 1
    folds = sorted((r for r in runs if r.data.tags.get(tag.FOLD) is not None), key=lambda r: r.data.tags[tag.FOLD])
    assert [r.data.tags[tag.FOLD] for r in folds] == ["0", "1"]
    assert folds[0].info.run_id == done_fold[0].info.run_id  # the finished fold was kept, not retrained
    for fold in folds:
        assert fold.info.status == "FINISHED"
        steps = [m.step for m in MlflowClient().get_metric_history(fold.info.run_id, "val_acc")]
        assert steps == list(range(1, epochs + 1))  # every epoch once: no gap, no duplicate
