"""DistributedDataParallel under a real `torchrun` (gloo, 2 processes on this machine's CPU cores): one MLflow run,
each metric step logged once, one model, and the same result as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from carsml.cli import run_experiment
from carsml.errors import CarsmlError, ConfigError
from carsml.tracking.epochs import epoch_key
from tests.conftest import REPO, free_port, kill_when
from tests.test_promote import write_colour_dataset

EPOCHS = 5
# the colour dataset (32 train images per class): without augmentation or a schedule, lr 1e-3, improved_cnn and
# baseline_cnn tell the four colours apart by epoch 3 and stay there (measured with 1 and 2 threads, bf16 and float32,
# batch 4 and 8), so one process and two reach the same (full) validation accuracy by construction, not by luck
OPTIONS = {"image_size": 32, "head_widths": "32", "epochs": EPOCHS, "batch_size": 8, "device": "cpu", "lr": 0.001,
           "augmentation": "none", "scheduler": "none", "system_metrics": False, "experiment_name": "ddp"}


def cli_args(options: dict[str, Any]) -> list[str]:
    return sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in options.items()), [])


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colour_dataset(tmp_path_factory.mktemp("ddp") / "colours", train_per_class=32)


def env_for(tmp_path: Path, uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CARSML_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def test_torchrun_two_processes_make_one_run_and_learn_what_one_process_learns(
        colours: Path, tmp_path: Path, isolated: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    options = {**OPTIONS, "data": str(colours)}
    # `--nproc 2` relaunches the command as `torchrun --standalone --nproc-per-node=2 -m carsml improved ...`
    launch = [sys.executable, "-m", "carsml", "improved", "--nproc", "2", *cli_args(options)]
    done = subprocess.run(launch, env=env_for(tmp_path, uri), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("best val acc") == 1  # one summary: rank 0's
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ddp").experiment_id
    runs = client.search_runs([experiment])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # only rank 0 talks to MLflow
    ddp = runs[0]
    assert ddp.info.status == "FINISHED" and ddp.data.tags["carsml.world_size"] == ddp.data.params["nproc"] == "2"
    for key in ("train_loss", "train_acc", "val_acc", "val_loss", "lr"):
        assert [m.step for m in client.get_metric_history(ddp.info.run_id, key)] == list(range(1, EPOCHS + 1)), key
    models = client.search_logged_models([experiment])
    assert [m.source_run_id for m in models] == [ddp.info.run_id]  # the model, logged once
    assert ddp.data.metrics["images_per_second"] > 0 and ddp.data.metrics["best_val_acc"] == 1.0

    # one process, batch 8 (what the two processes did with 4 each): the same result on this dataset
    mlflow.set_tracking_uri(uri)
    single = run_experiment("improved", {**options, "experiment_name": "single"})
    assert single.finals["best_val_acc"] == ddp.data.metrics["best_val_acc"]
    assert single.finals["test_acc"] == ddp.data.metrics["test_acc"] == 1.0


def test_a_killed_ddp_run_resumes_under_ddp_and_logs_every_epoch_once(
        colours: Path, tmp_path: Path) -> None:
    """SIGKILL the launcher, torchrun and both processes after epoch 2; `--resume-run-id` with `--nproc 2` continues
    the same run from rank 0's checkpoint, every epoch logged once."""
    uri, epochs = f"sqlite:///{tmp_path}/mlflow.db", 6
    env = env_for(tmp_path, uri)
    options = {**OPTIONS, "data": str(colours), "epochs": epochs, "nproc": 2}
    proc = subprocess.Popen([sys.executable, "-m", "carsml", "improved", *cli_args(options)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = MlflowClient(uri)

    def second_epoch_logged() -> str | None:
        try:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        except Exception:  # noqa: BLE001 - the store may not exist yet
            return None
        return runs[0].info.run_id if runs and len(client.get_metric_history(runs[0].info.run_id, "val_acc")) >= 2 \
            else None

    run_id = kill_when(proc, second_epoch_logged)
    assert run_id, "training finished or timed out before it could be killed mid-way"
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: nobody ended it
    resume = [sys.executable, "-m", "carsml", "improved", "--resume-run-id", run_id, "--nproc", "2"]
    done = subprocess.run(resume, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_acc", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, epochs + 1)), key
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_bad_process_counts_fail_before_any_run(
        colours: Path, tmp_path: Path, isolated: Path) -> None:
    with pytest.raises(ConfigError, match=r"nproc=64: this machine has \d+ CPU cores"):
        run_experiment("improved", {**OPTIONS, "data": str(colours), "nproc": 64})
    with pytest.raises(ConfigError, match=r"batch_size=7 is the global batch of 2 processes"):
        run_experiment("improved", {**OPTIONS, "data": str(colours), "nproc": 2, "batch_size": 7})
    # checked by the launching command, before torchrun starts the processes: one error, not one per process
    with pytest.raises(CarsmlError, match=r"storage='sqlite:////no/such/folder/optuna.db': folder /no/such/folder"):
        run_experiment("tune", {**OPTIONS, "data": str(colours), "nproc": 2,
                                "storage": "sqlite:////no/such/folder/optuna.db"})
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_an_entry_point_without_ddp_under_torchrun_and_a_rendezvous_that_never_forms_fail_clearly(
        colours: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    world = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(free_port()), "CARSML_DIST_TIMEOUT": "3"}
    env = {**env_for(tmp_path, uri), **world}
    cmd = [sys.executable, "-m", "carsml"]
    several = subprocess.run([*cmd, "transfer-all", "--data", str(colours)], env=env, capture_output=True,
                             text=True, timeout=300)
    assert several.returncode == 2 and "transfer_all does not train over several processes" in \
        " ".join(several.stderr.split())
    alone = subprocess.run([*cmd, "improved", *cli_args({**OPTIONS, "data": str(colours)})], env=env,
                           capture_output=True, text=True, timeout=300)  # rank 1 never comes
    assert alone.returncode == 2, alone.stderr[-2000:]
    assert "did not form within 3 s" in " ".join(alone.stderr.split())
    assert MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()]) == []


def artefacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += artefacts(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(out)


def test_folds_parallel_gives_the_parent_the_same_artefacts_as_folds_one_after_another(
        colours: Path, tmp_path: Path, isolated: Path) -> None:
    options = {**OPTIONS, "data": str(colours), "folds": 2, "epochs": 5}
    client = MlflowClient()
    parents = {}
    for parallel in (1, 2):
        table = run_experiment("kfold_baseline", {**options, "folds_parallel": parallel,
                                                  "experiment_name": f"folds-{parallel}"})
        assert list(table["fold"]) == [0, 1]
        parents[parallel] = client.get_run(mlflow.last_active_run().info.run_id)
    sequential, parallel = parents[1], parents[2]
    assert parallel.info.status == "FINISHED"
    assert artefacts(client, sequential.info.run_id) == artefacts(client, parallel.info.run_id)
    assert sorted(sequential.data.metrics) == sorted(parallel.data.metrics)
    for key in ("mean_train_loss", "mean_val_acc"):
        assert [m.step for m in client.get_metric_history(parallel.info.run_id, key)] == [1, 2, 3, 4, 5]
    children = client.search_runs([parallel.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parallel.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["fold 0 · baseline_cnn", "fold 1 · baseline_cnn"]
    assert all(c.info.status == "FINISHED" and c.data.params["folds_parallel"] == "2" for c in children)
    # the folds learn the colours either way (validation accuracy 1.0 from epoch 3 on this dataset; the losses
    # differ in the last digits: a worker runs torch on its share of the cores)
    assert parallel.data.metrics["cv_best_val_acc_mean"] == sequential.data.metrics["cv_best_val_acc_mean"] == 1.0
    with pytest.raises(ConfigError, match=r"folds_parallel=64: this machine has \d+ CPU cores"):
        run_experiment("kfold_baseline", {**options, "folds_parallel": 64})


def test_kfold_under_torchrun_trains_each_fold_over_both_processes(colours: Path, tmp_path: Path) -> None:
    """`kfold-baseline --nproc 2`: every fold is one DDP model; rank 0 alone logs the parent, one child per fold (each
    epoch once, one model each) and the cross-validation summary."""
    uri, epochs = f"sqlite:///{tmp_path}/mlflow.db", 5  # as the folds_parallel test: every fold learns by then
    options = {**OPTIONS, "data": str(colours), "folds": 2, "epochs": epochs, "nproc": 2}
    done = subprocess.run([sys.executable, "-m", "carsml", "kfold-baseline", *cli_args(options)],
                          env={**env_for(tmp_path, uri), "CARSML_DIST_TIMEOUT": "120"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ddp").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags),
                      key=lambda r: r.data.tags["carsml.fold"])
    assert [c.data.tags["carsml.fold"] for c in children] == ["0", "1"] and len(runs) == 3
    assert parent.info.status == "FINISHED" and parent.data.params["nproc"] == "2"
    for child in children:
        assert child.info.status == "FINISHED" and child.data.params["nproc"] == "2"
        for key in ("train_loss", "val_acc", epoch_key("test_acc")):  # test: rank 0 evaluates it alone
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == \
                list(range(1, epochs + 1)), key
    models = client.search_logged_models([experiment])
    assert sorted(m.source_run_id for m in models) == sorted(c.info.run_id for c in children)
    # both folds learn the colours (validation accuracy 1.0 from epoch 3 on this dataset: see OPTIONS)
    assert parent.data.metrics["cv_best_val_acc_mean"] == 1.0
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "mean_val_acc")] == list(range(1, epochs + 1))
    with pytest.raises(ConfigError, match="folds_parallel=2 with nproc=2: either"):
        run_experiment("kfold_baseline", {**options, "folds_parallel": 2})


def test_tuning_trials_under_torchrun_train_over_both_processes_and_prune_together(
        colours: Path, tmp_path: Path) -> None:
    """`tune --nproc 2`: rank 0 is the Optuna worker and both processes train each trial. A trial that rank 0's pruner
    stops stops in the replica too (else the next trial would wait for it in vain), and the study completes its
    budget."""
    # test_tune's seeded sampler: trial 0 samples lr 4e-3 and learns the colours by epoch 2 (val acc 1.0, rising from
    # 0.23 at epoch 1); trials 2 and 3 sample lr < 2e-6 and stay near chance (0.27), so with pruning allowed from
    # epoch 2 they are pruned there, one epoch before their end, by a wide margin; a trial follows a pruned one.
    # Trial 1 (lr 3e-3) may or may not be pruned.
    from tests.test_tune import TUNE

    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    options = {**TUNE, "data": str(colours), "storage": storage, "n_trials": 4, "nproc": 2, "epochs": 3,
               "pruner_warmup_epochs": 2, "system_metrics": False, "experiment_name": "ddp"}
    done = subprocess.run([sys.executable, "-m", "carsml", "tune", *cli_args(options)],
                          env={**env_for(tmp_path, uri), "CARSML_DIST_TIMEOUT": "120"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    states = optuna.trial.TrialState
    trials = sorted(optuna.load_study(study_name=TUNE["study_name"], storage=storage).trials, key=lambda t: t.number)
    assert [t.state for t in trials][::2] == [states.COMPLETE, states.PRUNED] and trials[3].state == states.PRUNED
    assert trials[1].state in (states.COMPLETE, states.PRUNED)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.params["nproc"] == "2" and len(runs) == 5
    by_number = {r.data.tags["carsml.trial_number"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    for trial in trials:
        run = by_number[str(trial.number)]
        pruned = trial.state == states.PRUNED
        assert run.info.status == ("KILLED" if pruned else "FINISHED")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == sorted(trial.intermediate_values) == ([1, 2] if trial.number >= 2 else steps)
        assert steps == [1, 2, 3] or pruned
