"""benchmarks/real_dev.py's bookkeeping: the order its runs need and the per-seed table of the goal's comparisons.

The runs themselves are carsml's entry points and the plain loop, tested elsewhere; what the benchmark adds is
arithmetic over them, and an order check that must fail before any run starts."""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("real_dev", REPO / "benchmarks" / "real_dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_named_before_its_source_is_refused(bench: ModuleType) -> None:
    assert bench.check_order(["carsml_select", "plain_80", "carsml_refit", "tta"]) is None
    assert bench.check_order(["improved_carsml", "improved_refit", "carsml_select", "tta"]) is None
    assert "carsml_refit needs carsml_select" in bench.check_order(["carsml_refit", "carsml_select"])
    assert "improved_refit needs improved_carsml" in bench.check_order(["improved_refit"])
    assert "tta needs carsml_refit or carsml_select" in bench.check_order(["plain_all", "tta"])


def test_seeds_are_distinct_integers(bench: ModuleType) -> None:
    assert bench.seeds("42") == [42] and bench.seeds("42,1,2") == [42, 1, 2]
    for bad in ("x", "1,1", ",", "1,x"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            bench.seeds(bad)


def test_the_per_seed_table_holds_each_seed_and_the_mean(bench: ModuleType) -> None:
    args = argparse.Namespace(data=Path("."), classes=20, size=96, epochs=30, device="cpu")
    runs = []
    for seed, (plain, refit, study, improved), (plain_wall, refit_wall) in (
            (42, (0.30, 0.36, 0.20, 0.44), (100, 110)), (1, (0.40, 0.42, 0.25, 0.45), (100, 90))):
        b = bench.Bench(args, seed)
        for name, acc, wall in (("plain_all", plain, plain_wall), ("carsml_refit", refit, refit_wall),
                                ("improved_study", study, 50), ("improved_refit", improved, 50)):
            b.ids[name] = f"{name}-{seed}"
            b.add(name, acc, None, wall, 1.0, None, b.ids[name], 30)
        runs.append(b)
    table, lines = bench.summary(runs)
    assert list(table["seed"]) == ["42", "1", "**mean**"]
    assert list(table["final model - plain_all (points)"]) == ["+6.0", "+2.0", "+4.0"]
    assert list(table["refit wall / plain_all wall"]) == ["1.10x", "0.90x", "1.00x"]
    assert list(table["improved_refit / improved_study"]) == ["2.20x", "1.80x", "1.98x"]  # mean: 0.445 / 0.225
    assert table["plain_all"].iloc[-1] == pytest.approx(0.35)
    assert "carsml_select - plain_80 (points)" not in table  # neither run was made
    assert lines == ["carsml_refit vs plain_all over 2 seeds: +4.0 points (standard error 2.0; per seed +6.0, +2.0)"]


def test_a_class_range_is_a_view_of_exactly_those_classes(bench: ModuleType, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "dev" / "car_data"
    for split in ("train", "test"):
        for name in ("Audi A", "BMW B", "Chevrolet C"):
            (data / split / name).mkdir(parents=True)
            (data / split / name / f"{split}.jpg").write_bytes(b"x")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert bench.class_view(data, 1, 2) == data  # the first N: carsml's own max_classes
    view = bench.class_view(data, 2, 0)
    assert view == bench.class_view(data, 2, 2)  # the same stable folder every time
    for split in ("train", "test"):
        assert sorted(p.name for p in (view / split).iterdir()) == ["BMW B", "Chevrolet C"]
        assert (view / split / "BMW B" / f"{split}.jpg").read_bytes() == b"x"
    assert sorted(p.name for p in (bench.class_view(data, 2, 1) / "train").iterdir()) == ["BMW B"]
    for first, count in ((0, 1), (3, 2), (4, 0)):
        with pytest.raises(ValueError, match="has 3 classes"):
            bench.class_view(data, first, count)


def test_the_real_big_trucks_class_is_new_to_the_model(tmp_path: Path, shared_data: Path) -> None:
    """real_finetune's new class: real sample crops of pickups and vans, none of a class the dataset already has."""
    spec = importlib.util.spec_from_file_location("real_finetune", REPO / "benchmarks" / "real_finetune.py")
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    index = pd.read_csv(finetune.SAMPLE / "sample_index.csv").set_index("fname")
    known = "Chevrolet Silverado 2500HD Regular Cab 2012"  # a pickup of the sample, made one of the data's classes
    data = tmp_path / "data"
    (data / "train" / known).mkdir(parents=True)
    folder = finetune.big_trucks(data, tmp_path / "BIG_TRUCKS")
    assert shared_data / "sample" == finetune.SAMPLE
    assert finetune.big_trucks(data, folder) == folder  # a second invocation reuses the folder
    names = index.loc[sorted(p.name for p in folder.iterdir()), "class_name"]
    assert len(names) >= 10 and known not in set(names)
    assert names.str.contains(r"\bCab\b|\bVan\b").all()
    assert all((folder / f).resolve().is_file() for f in names.index)


def test_a_reused_run_gives_the_row_it_gave_when_made() -> None:
    """real_finetune --reuse: a finished run's row from its MLflow record; an unfinished run is refused."""
    import mlflow

    from carsml.errors import ConfigError

    spec = importlib.util.spec_from_file_location("real_finetune", REPO / "benchmarks" / "real_finetune.py")
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    args = argparse.Namespace(data=Path("."), classes=0, model="efficientnet_lite0", size=160, epochs=10, device="cpu")
    mlflow.set_experiment("real-finetune")  # this test's store (another test may have left another experiment active)
    with mlflow.start_run() as plain:
        mlflow.log_params({"epochs": 10})
        mlflow.log_metrics({"test_acc": 0.61, "test_top5": 0.85, "wall_seconds": 1020.4, "images_per_second": 17.2})
    bench = finetune.Bench(args, 2, Path("w.pth"))
    bench.reuse("plain_all", plain.info.run_id)
    assert bench.ids == {"plain_all": plain.info.run_id}
    assert bench.rows == [{"run": "plain_all", "test acc": 0.61, "top-5": 0.85, "val acc": None, "epochs": "10",
                           "wall s": 1020, "train img/s": 17, "MLflow run": plain.info.run_id[:8]}]
    running = mlflow.start_run()
    with pytest.raises(ConfigError, match="is RUNNING, expected FINISHED"):
        bench.reuse("plain_lr", running.info.run_id)
    mlflow.end_run()
