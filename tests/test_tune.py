"""tune: an Optuna study as one MLflow parent run with a nested run per trial; pruned trials end KILLED, failed ones
FAILED without stopping the study; the `optuna` CLI reads what carsml wrote; a second worker resumes the study; two
workers (one through `mlflow run`) share a study while logging to a real `mlflow server`; bad options fail before any
run or study exists.

The data is four noisy colours: a good learning rate reaches val acc 0.75-1.0 after one epoch and a tiny one stays
at 0.25, so with the median pruner (n_startup_trials=1, no warm-up) and the seeded sampler below — trial 0 lr 4e-3,
trial 1 lr 3e-3, trials 2-4 lr < 2e-6 — trials 2, 3 and 4 are pruned after their first epoch, by a wide margin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from carsml.cli import run_experiment
from carsml.config import load_config
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments import tune
from carsml.experiments.common import resolve_dataset
from carsml.experiments.train import decode
from carsml.tracking.runs import start_run
from tests.conftest import REPO, kill_when, mlflow_server
from tests.test_mlflow_run import mlflow_run
from tests.test_promote import tracking_env, write_colour_dataset

TUNE = {"image_size": 32, "head_widths": "32", "epochs": 2, "batch_size": 8, "device": "cpu", "n_trials": 5,
        "sampler_seed": 10, "pruner_startup_trials": 1, "pruner_warmup_epochs": 0, "lr_min": 1e-7, "lr_max": 0.1,
        "study_name": "colours"}
States = optuna.trial.TrialState


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colour_dataset(tmp_path_factory.mktemp("colours"), train_per_class=30, test_per_class=6)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, colours: Path) -> dict[str, Any]:
    """The study of the module docstring, run once in its own tracking store and Optuna storage."""
    folder = tmp_path_factory.mktemp("tune-store")
    uri, storage = f"sqlite:///{folder}/mlflow.db", f"sqlite:///{folder}/optuna.db"
    with tracking_env(uri, folder, cache_dir):
        result = run_experiment("tune", {**TUNE, "data": str(colours), "storage": storage})
    return {"uri": uri, "storage": storage, "folder": folder, "result": result}


@pytest.fixture
def study_store(study: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study["uri"])
    mlflow.set_tracking_uri(study["uri"])
    return study


def all_runs() -> list[mlflow.entities.Run]:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def split_runs() -> tuple[list[mlflow.entities.Run], list[mlflow.entities.Run]]:
    """(parent runs, trial runs) of the tracking store."""
    runs = all_runs()
    return ([r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])


def test_study_prunes_poor_trials_and_logs_a_nested_run_per_trial(study_store: dict[str, Any]) -> None:
    client = MlflowClient()
    (parent,), children = split_runs()
    optuna_study = optuna.load_study(study_name="colours", storage=study_store["storage"])
    trials = {t.number: t for t in optuna_study.trials}
    assert len(trials) == len(children) == 5
    pruned = [t for t in trials.values() if t.state == States.PRUNED]
    complete = [t for t in trials.values() if t.state == States.COMPLETE]
    assert len(pruned) >= 1 and len(complete) >= 1 and len(pruned) + len(complete) == 5

    by_run = {c.info.run_id: c for c in children}
    for trial in trials.values():
        child = by_run[trial.user_attrs["mlflow_run_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["carsml.trial_number"] == str(trial.number)
        expected = ("KILLED", "pruned") if trial.state == States.PRUNED else ("FINISHED", "complete")
        assert (child.info.status, child.data.tags["carsml.trial_state"]) == expected
        for key in ("lr", "dropout", "weight_decay"):
            assert float(child.data.params[key]) == pytest.approx(trial.params[key])
        # the per-epoch val_acc the pruner saw is the curve logged to the trial's run (step = epoch)
        curve = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "val_acc")}
        assert curve == pytest.approx(trial.intermediate_values)
        assert not [k for k in child.data.metrics if "test" in k]  # the test split is never evaluated in tuning
        if trial.state == States.COMPLETE:
            assert child.data.metrics["best_val_acc"] == trial.value
    inputs = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert {tag.value for d in inputs for tag in d.tags if tag.key == "mlflow.data.context"} == {"train"}

    m, tags = parent.data.metrics, parent.data.tags
    assert parent.info.status == "FINISHED"
    assert (tags["optuna.storage"], tags["optuna.study_name"]) == (study_store["storage"], "colours")
    assert parent.data.params["study_name"] == "colours" and parent.data.params["storage"] == study_store["storage"]
    assert m["best_value"] == optuna_study.best_value and m["best_lr"] == pytest.approx(optuna_study.best_params["lr"])
    assert m["best_trial_number"] == optuna_study.best_trial.number
    assert tags["carsml.best_trial_run_id"] == optuna_study.best_trial.user_attrs["mlflow_run_id"]
    assert (m["n_trials_complete"], m["n_trials_pruned"], m["n_trials_failed"]) == (len(complete), len(pruned), 0)
    epochs = {t.number: len(t.intermediate_values) for t in trials.values()}
    assert m["trial_epochs_run"] == sum(epochs.values()) < m["trial_epochs_budget"] == 5 * TUNE["epochs"]
    assert m["trial_epochs_saved_by_pruning"] == sum(TUNE["epochs"] - epochs[t.number] for t in pruned) > 0
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/optimization_history.png", "figures/intermediate_values.png"} <= figures
    distinct_values = len({t.value for t in complete})
    assert ("figures/param_importances.png" in figures) == (distinct_values >= 2)
    assert ("carsml.param_importance" in tags) == (distinct_values < 2)
    result = study_store["result"]
    assert result.best_params == optuna_study.best_params and result.parent_run_id == parent.info.run_id


def test_optuna_cli_reads_the_study_carsml_wrote(study_store: dict[str, Any]) -> None:
    optuna_cli = str(Path(sys.executable).parent / "optuna")
    storage = study_store["storage"]

    def cli(*args: str) -> Any:
        done = subprocess.run([optuna_cli, *args, "--storage", storage, "-f", "json"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    studies = cli("studies")
    assert [(s["name"], s["n_trials"]) for s in studies] == [("colours", 5)]
    assert studies[0]["user_attrs"]["carsml_model"] == "improved_cnn"
    trials = cli("trials", "--study-name", "colours")
    assert sorted(t["state"] for t in trials) == sorted(
        t.state.name for t in optuna.load_study(study_name="colours", storage=storage).trials)
    assert "PRUNED" in {t["state"] for t in trials}
    best = cli("best-trial", "--study-name", "colours")
    assert best["value"] == study_store["result"].best_value
    assert best["user_attrs"]["mlflow_run_id"] == MlflowClient().get_run(
        study_store["result"].parent_run_id).data.tags["carsml.best_trial_run_id"]


def test_a_later_worker_resumes_the_study_and_must_share_its_settings(
        study: dict[str, Any], colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("mlflow.db", "optuna.db"):  # a private copy: the module's study stays as it was
        shutil.copy(study["folder"] / name, tmp_path / f"copy-{name}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/copy-mlflow.db")
    storage = f"sqlite:///{tmp_path}/copy-optuna.db"
    base = {**TUNE, "data": str(colours), "storage": storage, "sampler_seed": None}
    result = run_experiment("tune", {**base, "n_trials": 1})
    assert len(optuna.load_study(study_name="colours", storage=storage).trials) == 6
    assert result.sampler_seed == 42 + 5  # seed + trials already in the study: new points, not a replay
    parents, children = split_runs()
    assert len(parents) == 2 and len(children) == 6
    assert [c.data.tags["carsml.trial_number"] for c in children
            if c.data.tags["mlflow.parentRunId"] == result.parent_run_id] == ["5"]
    for overrides, fragment in (({"model": "baseline_cnn"}, "model: study has 'improved_cnn', this worker "
                                                            "'baseline_cnn'"),
                                ({"load_if_exists": False}, "already exists")):
        with pytest.raises(ConfigError, match=fragment):
            run_experiment("tune", {**base, **overrides})
    assert len(all_runs()) == 8 and len(optuna.load_study(study_name="colours", storage=storage).trials) == 6


def fail_some_trials(monkeypatch: pytest.MonkeyPatch, failing: set[int]) -> None:
    """Make the training of the given trial numbers (in call order) raise, as an out-of-memory error would."""
    real, calls = tune.fit_and_log, []

    def fit_and_log(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) - 1 in failing:
            raise RuntimeError("simulated out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(tune, "fit_and_log", fit_and_log)


SMALL = {**TUNE, "epochs": 1, "n_trials": 2, "pruner": "none", "lr_min": 1e-3, "lr_max": 1e-2}


def test_a_failing_trial_ends_failed_and_the_study_goes_on(colours: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_some_trials(monkeypatch, {0})
    result = run_experiment("tune", {**SMALL, "data": str(colours)})
    assert result.states == {0: "failed", 1: "complete"}
    states = [t.state for t in optuna.load_study(study_name="colours", storage="sqlite:///optuna.db").trials]
    assert states == [States.FAIL, States.COMPLETE]
    (parent,), children = split_runs()
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["carsml.trial_number"] == "0"
    assert failed[0].data.tags["carsml.trial_state"] == "failed"
    assert failed[0].data.tags["carsml.error"] == "RuntimeError: simulated out of memory"
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials_failed"] == 1


def test_a_study_without_any_completed_trial_fails_clearly(colours: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_some_trials(monkeypatch, {0, 1})
    with pytest.raises(CarsmlError, match=r"no trial completed \(0 pruned, 2 failed"):
        run_experiment("tune", {**SMALL, "data": str(colours)})
    (parent,), children = split_runs()
    assert parent.info.status == "FAILED" and "no trial completed" in parent.data.tags["carsml.error"]
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]


def test_figures_of_a_study_with_and_without_enough_completed_trials() -> None:
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
             "dropout": optuna.distributions.FloatDistribution(0.0, 0.5)}
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3, "dropout": 0.1}, distributions=space, value=0.5))
    with start_run("tune", {}) as one:
        tune._figures(study, seed=0)
    for i, (lr, dropout) in enumerate([(1e-2, 0.2), (3e-2, 0.4), (2e-4, 0.3)]):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "dropout": dropout}, distributions=space,
                                                  value=0.6 + i / 10))
    with start_run("tune", {}) as many:
        tune._figures(study, seed=0)
    client = MlflowClient()
    runs = {r.info.run_id: r for r in all_runs()}
    few, enough = runs[one.info.run_id], runs[many.info.run_id]
    assert few.data.tags["carsml.param_importance"] == ("skipped: needs >= 2 completed trials with different "
                                                        "values; 1 completed, with 1 distinct value(s) (0.5)")
    assert "figures/param_importances.png" not in {a.path for a in client.list_artifacts(one.info.run_id, "figures")}
    assert "figures/param_importances.png" in {a.path for a in client.list_artifacts(many.info.run_id, "figures")}
    importances = [enough.data.metrics[f"importance_{k}"] for k in ("lr", "dropout")]
    assert sum(importances) == pytest.approx(1.0) and "carsml.param_importance" not in enough.data.tags


@pytest.mark.parametrize("overrides, fragment", [
    ({"lr_min": 0.1, "lr_max": 0.01}, "lr_min=0.1 is larger than lr_max=0.01: the range is inverted"),
    ({"lr_min": 0.0}, "lr_min=0.0: lr is searched on a log scale"),
    ({"weight_decay_min": -0.0001}, "weight_decay_min=-0.0001: weight_decay is searched on a log scale"),
    ({"dropout_max": 1.0}, r"dropout range \[0.0, 1.0\]: expected values in \[0, 1.0\)"),
    ({"dropout_min": 0.5, "dropout_max": 0.2}, "dropout_min=0.5 is larger than dropout_max=0.2"),
    ({"sampler": "grid"}, "'sampler': expected one of tpe, random; got 'grid'"),
    ({"pruner": "asha"}, "'pruner': expected one of median, hyperband, none; got 'asha'"),
    ({"n_trials": 0}, "the study would never stop"),
    ({"resume_run_id": "abc"}, "resumed through its Optuna storage"),
    ({"storage": "not a url"}, "storage='not a url': not a SQLAlchemy URL"),
    ({"storage": "sqlite:///:memory:"}, "in-memory SQLite study cannot be shared"),
    ({"storage": "sqlite:////nonexistent/folder/optuna.db"}, "folder /nonexistent/folder does not exist"),
    # no driver installed, or (with one) nothing listening on port 1: either way, said before any trial
    ({"storage": "postgresql://carsml:secret@127.0.0.1:1/optuna"}, r"storage='postgresql://carsml:\*\*\*@127"),
])
def test_bad_options_fail_before_any_run_or_study(overrides: dict[str, Any], fragment: str, colours: Path,
                                                  isolated: Path) -> None:
    with pytest.raises(CarsmlError, match=fragment) as info:
        run_experiment("tune", {**TUNE, "data": str(colours), **overrides})
    assert "secret" not in str(info.value)  # a database password is never printed
    # neither the tracking store nor the study storage was touched, let alone a run created
    assert not (isolated / "mlflow.db").exists() and not (isolated / "optuna.db").exists()


# ------------------------------------------------------------------------------- two workers, one tracking server


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` for this test (stopped afterwards)."""
    with mlflow_server(tmp_path) as url:
        yield url


def test_two_workers_share_one_study_and_log_to_a_tracking_server(
        tracking_server: str, colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    params = {**TUNE, "data": str(colours), "storage": storage, "study_name": "parallel", "epochs": 1,
              "n_trials": 2, "pruner": "none"}
    decode(load_config("tune", params), resolve_dataset(load_config("tune", params)), "train")  # warm the cache
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    MlflowClient(tracking_server).create_experiment("stanford-cars")  # not raced for by the two workers
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**params, "sampler_seed": 1}.items()]
    cli_worker = subprocess.Popen([str(Path(sys.executable).parent / "carsml"), "tune", *args], cwd=tmp_path,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # the second worker the way users start it: `mlflow run . -e tune` (it waits for its own process)
        done = mlflow_run("tune", {**params, "sampler_seed": 2}, tmp_path)
        out, _ = cli_worker.communicate(timeout=600)
    finally:
        if cli_worker.poll() is None:
            cli_worker.kill()
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli_worker.returncode == 0, out[-3000:]

    trials = optuna.load_study(study_name="parallel", storage=storage).trials
    assert len(trials) == 4 and {t.state for t in trials} == {States.COMPLETE}
    mlflow.set_tracking_uri(tracking_server)
    parents, children = split_runs()
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    assert sum(p.data.tags.get("mlflow.project.entryPoint") == "tune" for p in parents) == 1  # the mlflow run one
    for parent in parents:
        mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(mine) == 2 and parent.data.tags["optuna.study_name"] == "parallel"
    assert {c.info.run_id for c in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert str(REPO) not in storage  # nothing was written into the repository


def test_a_killed_workers_trial_is_failed_and_retried_by_the_next_worker(
        colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker A (its own process) is SIGKILLed inside its trial; workers B (this process) and C (another), started
    after two heartbeat intervals, share the study: the first to start a trial fails A's (and its MLflow run) and
    retries its parameters, and the two complete their budget."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    params = {**TUNE, "data": str(colours), "storage": storage, "study_name": "killed", "pruner": "none",
              "heartbeat_interval": 1, "max_retry": 1, "n_trials": 1, "epochs": 30}  # a trial lasts seconds
    monkeypatch.chdir(tmp_path)
    decode(load_config("tune", params), resolve_dataset(load_config("tune", params)), "train")  # warm the cache
    args = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
    worker_a = subprocess.Popen([sys.executable, "-m", "carsml.cli", "tune", *args], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})

    def trial_running() -> str | None:
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).trials
        except KeyError:  # the study does not exist yet
            return None
        running = [t for t in trials if t.state == States.RUNNING and "mlflow_run_id" in t.user_attrs]
        return running[0].user_attrs["mlflow_run_id"] if running else None

    killed_run = kill_when(worker_a, trial_running, timeout_s=600)
    assert killed_run, "worker A ended before its trial could be killed"
    time.sleep(2.5)  # past the grace period (two heartbeat intervals) without a heartbeat

    worker_c = subprocess.Popen([sys.executable, "-m", "carsml.cli", "tune", *args], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        result = run_experiment("tune", params)  # worker B
    finally:
        _, c_errors = worker_c.communicate(timeout=600)
    assert worker_c.returncode == 0, c_errors[-2000:]
    trials = optuna.load_study(study_name="killed", storage=storage).trials
    assert trials[0].state == States.FAIL  # A's trial, failed by B or C
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == trials[0].number]
    assert len(retried) == 1 and retried[0].params == trials[0].params
    assert sum(t.state == States.COMPLETE for t in trials) == 2 and len(result.states) == 1
    assert not any(t.state == States.RUNNING for t in trials)
    killed = MlflowClient().get_run(killed_run)
    assert killed.info.status == "FAILED" and "no heartbeat" in killed.data.tags["carsml.error"]


def test_optuna_speaks_per_trial_only_when_verbose(colours: Path, tmp_path: Path) -> None:
    """The carsml commands' quiet default covers Optuna too (it sets its own level, INFO, when first used): its
    "Trial N finished" lines are below the level a tune run leaves it at, unless --verbose."""
    import logging

    from carsml.tracking.runs import quiet_mlflow

    options = {**TUNE, "data": str(colours), "n_trials": 1, "epochs": 1}
    try:
        for quiet, level in ((True, logging.WARNING), (False, logging.INFO)):
            quiet_mlflow(quiet)
            optuna.logging.set_verbosity(logging.DEBUG)  # whatever an import or another library left
            run_experiment("tune", {**options, "study_name": f"quiet-{quiet}",
                                    "storage": f"sqlite:///{tmp_path}/{quiet}.db"})
            assert optuna.logging.get_verbosity() == level
    finally:
        quiet_mlflow(False)
