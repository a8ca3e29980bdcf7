"""Locating the files of each Stanford Cars layout on disk, and listing folders and images for the readers.

`_find_devkit` and `_find_kaggle` record which annotation files and image folders of the devkit and Kaggle layouts
exist under a root (as the known downloads and copies unpack them); `_class_folder_splits` finds class-per-folder
image trees; `_check_images_exist` checks that every annotated image is on disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carsml.data.readers_annotations import _SHOW
from carsml.data.table import SPLITS
from carsml.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

_TORCHVISION_SUBDIR = "stanford_cars"  # torchvision's root holds the data one level down
# Where {train,test}/ live relative to the root (the Kaggle download unpacks to car_data/car_data/).
_SPLIT_BASES = (("car_data", "car_data"), ("car_data",), ())
_DEVKIT_IMAGE_DIRS = {"cars_train", "cars_test"}
_SKIPPED_DIR_NAMES = {"__MACOSX"}


def _first_file(*candidates: Path) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _first_dir(*candidates: Path) -> Path | None:
    return next((p for p in candidates if p.is_dir()), None)


def _scan(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc})") from exc


def _visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders, sorted, skipping hidden ones and macOS archive leftovers."""
    return sorted(Path(e.path) for e in _scan(folder)
                  if e.is_dir() and not e.name.startswith(".") and e.name not in _SKIPPED_DIR_NAMES)


def _image_files(folder: Path) -> list[str]:
    """Names of the image files directly in `folder`, sorted."""
    return sorted(e.name for e in _scan(folder) if not e.name.startswith(".")
                  and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())


def _rel(path: Path, root: Path) -> str:
    suffix = "/" if path.is_dir() else ""
    try:
        return str(path.relative_to(root)) + suffix
    except ValueError:
        return str(path) + suffix


@dataclass
class _DevkitFiles:
    root: Path
    meta: Path | None
    annos: dict[str, Path]  # split -> labelled annotation file
    test_unlabelled: Path | None
    images: dict[str, Path]  # split -> image folder

    @property
    def has_annotations(self) -> bool:
        return self.meta is not None and bool(self.annos or self.test_unlabelled)

    def found(self) -> list[str]:
        items = [self.meta, *self.annos.values(), self.test_unlabelled, *self.images.values()]
        return [_rel(p, self.root) for p in items if p is not None]


def _find_devkit(root: Path) -> _DevkitFiles:
    # devkit/ as car_devkit.tgz unpacks; car_devkit/devkit/ as in the Kaggle "stanford-cars-dataset" copy.
    dirs = [root / "devkit", root / "car_devkit" / "devkit"]
    annos = {}
    train = _first_file(*(d / "cars_train_annos.mat" for d in dirs))
    if train:
        annos["train"] = train
    # torchvision wants the labelled test file next to devkit/; many copies keep it inside devkit/.
    test = _first_file(root / "cars_test_annos_withlabels.mat",
                       *(d / "cars_test_annos_withlabels.mat" for d in dirs))
    if test:
        annos["test"] = test
    images = {}
    for split in SPLITS:
        # cars_train/cars_train/ is how the Kaggle "stanford-cars-dataset" copy unpacks.
        folder = _first_dir(root / f"cars_{split}" / f"cars_{split}", root / f"cars_{split}")
        if folder:
            images[split] = folder
    return _DevkitFiles(root, _first_file(*(d / "cars_meta.mat" for d in dirs)), annos,
                        _first_file(*(d / "cars_test_annos.mat" for d in dirs)), images)


@dataclass
class _KaggleFiles:
    root: Path
    names: Path | None
    annos: dict[str, Path]  # split -> anno_<split>.csv
    split_base: Path | None  # the folder holding train/ and/or test/

    @property
    def has_annotations(self) -> bool:
        return self.names is not None and bool(self.annos)

    def found(self) -> list[str]:
        out = [_rel(p, self.root) for p in (self.names, *self.annos.values()) if p is not None]
        if self.split_base is not None:
            out += [_rel(self.split_base / s, self.root) for s in SPLITS if (self.split_base / s).is_dir()]
        return out


def _find_split_base(root: Path) -> Path | None:
    bases = (root.joinpath(*parts) for parts in _SPLIT_BASES)
    return next((b for b in bases if (b / "train").is_dir() or (b / "test").is_dir()), None)


def _find_kaggle(root: Path) -> _KaggleFiles:
    annos = {s: root / f"anno_{s}.csv" for s in SPLITS if (root / f"anno_{s}.csv").is_file()}
    return _KaggleFiles(root, _first_file(root / "names.csv"), annos, _find_split_base(root))


def _has_class_folder(folder: Path) -> bool:
    return any(_image_files(d) for d in _visible_dirs(folder))


def _class_folder_splits(root: Path) -> dict[str, Path] | None:
    """split -> folder of class folders: {train,test}/ under a split base, else the root itself (all train)
    when its sub-folders hold images directly. None when there are no class folders with images."""
    base = _find_split_base(root)
    if base is not None:
        splits = {s: base / s for s in SPLITS if (base / s).is_dir()}
        return splits if any(_has_class_folder(f) for f in splits.values()) else None
    if {d.name for d in _visible_dirs(root)} & _DEVKIT_IMAGE_DIRS:
        return None  # devkit image folders whose annotations are missing are not two classes
    return {"train": root} if _has_class_folder(root) else None


def _check_images_exist(folder: Path, relpaths: np.ndarray, source: Path, split: str) -> None:
    """Every annotated image must be on disk: one error with the count and the first few missing paths.
    Lists each folder once instead of stat-ing every file."""
    present: dict[str, set[str]] = {}
    missing = []
    for rel in relpaths:
        sub, _, name = str(rel).rpartition("/")
        if sub not in present:
            d = folder / sub if sub else folder
            present[sub] = {e.name for e in _scan(d) if e.is_file()} if d.is_dir() else set()
        if name not in present[sub]:
            missing.append(rel)
    if missing:
        shown = "\n  ".join(str(folder / m) for m in missing[:_SHOW])
        raise DataError(f"{len(missing)} of the {len(relpaths)} {split} images listed in {source} are "
                        f"missing from {folder}, e.g.:\n  {shown}")
