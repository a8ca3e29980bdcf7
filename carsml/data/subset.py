"""Real class-folder subsets of a Stanford Cars download: the real dev set that carsml's docs measure on, rebuilt by
anyone who has the dataset (`carsml data subset`).

The dev set is 60 classes of the official train split, each image cropped to its bounding box and downsized so that
its longer side is at most 320 px (bicubic, JPEG quality 90), split 70/30 into `car_data/train` and `car_data/test`.
Which image goes where is `real_dev_index.csv` (split, class_name, class_id_1based, fname), shipped with carsml; the
docs' smaller subsets are runs of its classes in name order (`max_classes`, or benchmarks' `--first-class`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from PIL import Image

from carsml.data.images import crop_to_box, open_rgb
from carsml.data.readers_kaggle import class_folder
from carsml.data.table import Dataset
from carsml.errors import ConfigError, DataError

DEV_INDEX = Path(__file__).with_name("real_dev_index.csv")
INDEX_COLUMNS = ("split", "class_name", "class_id_1based", "fname")
MAX_SIDE = 320
JPEG_QUALITY = 90


def read_index(path: Path = DEV_INDEX, class_ids: list[int] | None = None) -> pd.DataFrame:
    """The index rows (of `class_ids` only, when given); DataError / ConfigError naming the file and what is wrong."""
    index = pd.read_csv(path, dtype={"fname": str, "class_name": str, "split": str})
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(INDEX_COLUMNS)}")
    bad = index[~index["split"].isin(("train", "test"))]
    if len(bad):
        raise DataError(f"{path}: row {bad.index[0] + 2} has split {bad['split'].iloc[0]!r}; expected train or test")
    if class_ids:
        unknown = sorted(set(class_ids) - set(index["class_id_1based"]))
        if unknown:
            raise ConfigError(f"class_ids: {unknown} are not in {path.name} (it holds class ids "
                              f"{', '.join(map(str, sorted(index['class_id_1based'].unique())))})")
        index = index[index["class_id_1based"].isin(class_ids)]
    return index.reset_index(drop=True)


def build_subset(dataset: Dataset, index: pd.DataFrame, out: Path, max_side: int = MAX_SIDE) -> Path:
    """Write `index`'s images of `dataset` (a Stanford Cars download, official train split) as box crops under
    `out/car_data/{split}/{class}/` plus `out/index.csv`. Every file and class is checked before anything is written;
    the folder appears whole or not at all."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={str(out)!r} exists and is not empty; name a new folder")
    if max_side < 16:
        raise ConfigError(f"max_side={max_side}: expected at least 16 pixels")
    if not dataset.has_images:
        raise DataError(f"{dataset.root}: annotations only, no images on disk; expected the download's images too")
    train = dataset.split("train").set_index("fname")
    absent = index[~index["fname"].isin(train.index)]
    if len(absent):
        raise DataError(f"{dataset.root}: {len(absent)} image(s) of the index are not in its train split, e.g. "
                        f"{absent['fname'].iloc[0]} ({absent['class_name'].iloc[0]}); expected a full Stanford Cars "
                        "download (devkit or Kaggle layout)")
    rows = train.loc[index["fname"]]
    wrong = index[rows["class_name"].map(class_folder).to_numpy() != index["class_name"].map(class_folder).to_numpy()]
    if len(wrong):
        fname = wrong["fname"].iloc[0]
        raise DataError(f"{dataset.root}: {fname} is {train.loc[fname, 'class_name']!r} there but "
                        f"{wrong['class_name'].iloc[0]!r} in the index; is this Stanford Cars?")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for (_, spec), (_, row) in zip(index.iterrows(), rows.iterrows(), strict=True):
            crop = crop_to_box(open_rgb(row["path"]), (row["x1"], row["y1"], row["x2"], row["y2"]))
            scale = max_side / max(crop.size)
            if scale < 1:
                crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                                   Image.Resampling.BICUBIC)
            target = partial / "car_data" / spec["split"] / class_folder(spec["class_name"]) / spec["fname"]
            target.parent.mkdir(parents=True, exist_ok=True)
            crop.save(target, "JPEG", quality=JPEG_QUALITY)
        index.to_csv(partial / "index.csv", index=False)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out / "car_data"
