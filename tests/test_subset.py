"""`carsml data subset`: a real class-folder subset rebuilt from a Stanford Cars download, as the index says.

A synthetic download in the devkit layout stands in for Stanford Cars (its file names and class names are the index's
only link to the images); the shipped dev-set index is checked against the real annotations in ../shared."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from carsml.cli import app
from carsml.data.readers import load_dataset
from carsml.data.readers_kaggle import class_folder
from carsml.data.subset import DEV_INDEX, read_index
from carsml.data.synthetic import generate_synthetic

runner = CliRunner()


@pytest.fixture(scope="module")
def download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("download")
    generate_synthetic(out, num_classes=3, images_per_class=6, frame_size=(96, 64), extra_class_images=0,
                       grayscale_fraction=0.0)
    return out


def index_of(download: Path, per_class: int = 3) -> pd.DataFrame:
    """An index like the dev set's: a few official-train images per class, split train / test."""
    train = load_dataset(download).split("train")
    rows = []
    for label, group in train.groupby("label"):
        for i, (_, r) in enumerate(group.head(per_class).iterrows()):
            rows.append({"split": "test" if i == 0 else "train", "class_name": r["class_name"],
                         "class_id_1based": label + 1, "fname": r["fname"]})
    return pd.DataFrame(rows)


def test_the_subset_holds_the_box_crops_the_index_names(download: Path, tmp_path: Path) -> None:
    index = index_of(download)
    index.to_csv(tmp_path / "index.csv", index=False)
    out = tmp_path / "subset"
    done = runner.invoke(app, ["data", "subset", "--data", str(download), "--out", str(out), "--index",
                               str(tmp_path / "index.csv"), "--class-ids", "1,3", "--max-side", "24"])
    assert done.exit_code == 0, done.output
    kept = index[index["class_id_1based"].isin([1, 3])]
    written = sorted(p.relative_to(out / "car_data").as_posix() for p in (out / "car_data").rglob("*.jpg"))
    assert written == sorted(f"{r.split}/{class_folder(r.class_name)}/{r.fname}" for r in kept.itertuples())
    assert pd.read_csv(out / "index.csv")["fname"].tolist() == kept["fname"].tolist()
    table = load_dataset(download).split("train").set_index("fname")
    for r in kept.itertuples():
        box = table.loc[r.fname]
        w, h = box["x2"] - box["x1"], box["y2"] - box["y1"]
        with Image.open(out / "car_data" / r.split / class_folder(r.class_name) / r.fname) as img:
            assert max(img.size) <= 24 and abs(img.width / img.height - w / h) < 0.2  # the box, downsized
    subset = load_dataset(out / "car_data")  # carsml reads it as class folders
    assert subset.num_classes == 2 and len(subset.table) == len(kept)
    again = runner.invoke(app, ["data", "subset", "--data", str(download), "--out", str(out)])
    assert again.exit_code != 0 and "exists and is not empty" in again.output


def test_an_index_the_download_cannot_fill_writes_nothing(download: Path, tmp_path: Path) -> None:
    index = index_of(download)
    index.loc[1, "fname"] = "99999.jpg"
    index.to_csv(tmp_path / "index.csv", index=False)
    out = tmp_path / "subset"
    done = runner.invoke(app, ["data", "subset", "--data", str(download), "--out", str(out), "--index",
                               str(tmp_path / "index.csv")])
    assert done.exit_code != 0 and "99999.jpg" in done.output and "not in its train split" in done.output
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    unknown = runner.invoke(app, ["data", "subset", "--data", str(download), "--out", str(out), "--class-ids", "0"])
    assert unknown.exit_code != 0 and "class_ids: [0] are not in real_dev_index.csv" in unknown.output


def test_the_shipped_index_is_the_dev_set_and_agrees_with_the_real_annotations(shared_data: Path) -> None:
    index = read_index(DEV_INDEX)
    assert index["class_name"].nunique() == 60
    assert index["split"].value_counts().to_dict() == {"train": 1751, "test": 755}
    real = load_dataset(shared_data).split("train").set_index("fname")
    assert (real.loc[index["fname"], "label"].to_numpy() + 1 == index["class_id_1based"].to_numpy()).all()
    dev = shared_data.parent / "stanford_cars_real_dev" / "index.csv"
    if dev.is_file():
        assert pd.read_csv(dev).equals(pd.read_csv(DEV_INDEX))
