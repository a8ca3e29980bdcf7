"""The `carsml` command line: generated options, the synthetic dataset command, clear errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torchvision
from typer.testing import CliRunner

from carsml.cli import app, run_experiment
from carsml.config import options
from carsml.errors import DataError

runner = CliRunner()


def test_help_lists_every_entry_point_and_option_defaults() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("baseline", "kfold-baseline", "improved", "kfold-improved", "data"):
        assert command in result.output
    improved = runner.invoke(app, ["improved", "--help"], env={"COLUMNS": "250"})
    assert improved.exit_code == 0
    for key in options("improved"):
        assert f"--{key.replace('_', '-')}" in improved.output
    assert "(default: 0.0001)" in improved.output  # the study's L2, from carsml/experiments/defaults/improved.yaml


def test_data_synth_writes_a_dataset_torchvision_loads(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--classes", "3", "--images-per-class", "6",
                                 "--extra-class-images", "4"])
    assert result.exit_code == 0, result.output
    train = torchvision.datasets.StanfordCars(str(out), split="train")
    test = torchvision.datasets.StanfordCars(str(out), split="test")
    assert len(train) + len(test) == 18 and len(train.classes) == 3
    image, label = train[0]
    assert image.mode == "RGB" and 0 <= label < 3
    assert len(list((out / "BIG_TRUCKS").glob("*.jpg"))) == 4


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "analyze", "--data", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    assert "nowhere" in result.output
    bad_value = runner.invoke(app, ["improved", "--epochs", "many"], env={"COLUMNS": "250"})
    assert bad_value.exit_code != 0 and "Invalid value for '--epochs'" in bad_value.output


def test_unknown_data_value_fails_before_any_run() -> None:
    with pytest.raises(DataError, match="synthtic"):
        run_experiment("data_analysis", {"data": "synthtic"})
    assert mlflow.get_experiment_by_name("stanford-cars") is None or not mlflow.search_runs(
        experiment_names=["stanford-cars"]).shape[0]


def test_empty_data_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        run_experiment("data_analysis", {"data": str(tmp_path / "empty")})


def _carsml(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    import os
    import sys

    bin_dir = Path(sys.executable).parent
    return subprocess.run([str(bin_dir / "carsml"), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env_extra})


TINY_ARGS = ["--synth-classes", "4", "--synth-images-per-class", "16", "--image-size", "32", "--head-widths", "64,32",
             "--epochs", "2", "--batch-size", "16", "--device", "cpu"]


def test_a_training_command_ends_with_a_summary_and_without_mlflow_info_lines(tmp_path: Path) -> None:
    import os

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/quiet.db", "CARSML_CACHE": os.environ["CARSML_CACHE"]}
    done = _carsml(["improved", *TINY_ARGS], env)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (logged,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics, tags = logged.data.metrics, logged.data.tags
    assert f"run       {logged.info.run_id}  improved-improved_cnn  FINISHED" in output
    assert f"model     {tags['carsml.model_uri']}" in output and tags["carsml.model_uri"].startswith("models:/")
    assert f"best val acc {metrics['best_val_acc']:.4f} · test acc {metrics['test_acc']:.4f}" in output
    assert f"#/experiments/{logged.info.experiment_id}/runs/{logged.info.run_id}" in output
    assert f"next      carsml errors --run-id {logged.info.run_id}" in output
    assert " INFO mlflow" not in output and "Downloading artifacts" not in output
    verbose = _carsml(["improved", *TINY_ARGS, "--epochs", "1", "--verbose"],
                      {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/verbose.db"})
    assert verbose.returncode == 0 and " INFO mlflow" in verbose.stdout + verbose.stderr


def test_the_next_hint_names_this_run_its_family_and_the_registered_model() -> None:
    """After transfer: features-rf on this very run; after features_rf: promote of its family in its experiment;
    after promote: serve the model it registered (its model_name, else carsml-<model>)."""
    from carsml.tracking import tags as tag
    from carsml.tracking.summary import key_result, next_command

    mlflow.set_experiment("real cars")
    runs = {}
    for entry, tags, params in (("transfer", {tag.MODEL: "efficientnet_lite0"}, {}),
                                ("features_rf", {tag.MODEL: "efficientnet_lite0"}, {"model": "resnet50"}),
                                ("promote", {}, {"model": "efficientnet_lite0", "model_name": "None"}),
                                ("promote", {}, {"model": "efficientnet_lite0", "model_name": "lite-cars"})):
        with mlflow.start_run(tags={tag.ENTRY_POINT: entry, **tags}) as active:
            mlflow.log_params(params)
        runs.setdefault(entry, []).append(mlflow.get_run(active.info.run_id))
    transfer, features_rf, promote = runs["transfer"][0], runs["features_rf"][0], runs["promote"]
    assert next_command("transfer", transfer, "real cars").startswith(
        f"carsml features-rf --run-id {transfer.info.run_id} ")
    assert next_command("features_rf", features_rf, "real cars") == \
        "carsml promote --model efficientnet_lite0 --experiment-name 'real cars'"
    assert "-m models:/carsml-efficientnet_lite0@champion " in next_command("promote", promote[0], "real cars")
    assert "-m models:/lite-cars@champion " in next_command("promote", promote[1], "real cars")
    with mlflow.start_run(tags={tag.ENTRY_POINT: "tune"}) as active:
        mlflow.log_params({"model": "improved_cnn"})
        mlflow.log_metrics({"best_value": 0.5, "best_trial_number": 0, "best_lr": 0.0012345, "best_dropout": 0.25})
    tune = mlflow.get_run(active.info.run_id)
    assert next_command("tune", tune, "real cars").startswith(  # what is known is filled in, the rest named
        "carsml improved --model improved_cnn --lr 0.00123 --dropout 0.25 --weight-decay <best weight decay> ")
    assert key_result("tune", tune.data.metrics) == "best val acc 0.5000 · best trial 0"  # a count, not 0.0000


def test_help_loads_neither_torch_nor_mlflow() -> None:
    """`carsml --help` and `carsml <command> --help` answer before the heavy libraries load (they took 4.5 s and
    933 MiB when torch, timm and MLflow were imported first): they load when a command runs."""
    probe = ("import sys; from typer.testing import CliRunner; from carsml.cli import app; "
             "out = CliRunner().invoke(app, ['improved', '--help']); assert out.exit_code == 0, out.output; "
             "print(sorted(m for m in ('torch', 'timm', 'mlflow', 'torchvision', 'optuna') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
