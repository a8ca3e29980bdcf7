"""The `carsml` command line: generated options, the synthetic dataset command, clear errors without tracebacks."""

from __future__ import annotations

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
    assert "(default: 0.0001)" in improved.output  # the study's L2, from experiments/improved.yaml


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
