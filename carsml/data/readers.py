"""Readers: the common ways of storing Stanford Cars (or any class-per-folder collection) -> one `Dataset`.

Layouts (trees and quirks in docs/data.md), each read by its own module:
    devkit            torchvision's StanfordCars: devkit/*.mat annotations + cars_train/, cars_test/ images
                      (carsml.data.readers_devkit)
    kaggle_folders    Kaggle "stanford-car-dataset-by-classes-folder": names.csv, anno_*.csv and
                      {train,test}/<class name>/<fname> image folders (carsml.data.readers_kaggle)
    class_folders     {train,test}/<class>/<image> (or <class>/<image>) without annotation files
                      (carsml.data.readers_folders)
    annotations_only  the devkit .mat files or the Kaggle CSVs with no images on disk (statistics only; here)

This module detects the layout of a folder (`detect_layout`) and dispatches to its reader (`load_dataset`). Locating
the files is carsml.data.readers_files; the annotation arrays shared by the readers are carsml.data.readers_annotations.
"""

from __future__ import annotations

from pathlib import Path

from carsml.data.readers_annotations import _frame
from carsml.data.readers_devkit import _devkit_parts, read_devkit
from carsml.data.readers_files import (
    _TORCHVISION_SUBDIR,
    IMAGE_EXTENSIONS,
    _class_folder_splits,
    _DevkitFiles,
    _find_devkit,
    _find_kaggle,
    _KaggleFiles,
    _scan,
)
from carsml.data.readers_folders import read_class_folders
from carsml.data.readers_kaggle import _kaggle_parts, read_kaggle_folders
from carsml.data.table import Dataset
from carsml.errors import DataError

LAYOUTS = ("devkit", "kaggle_folders", "class_folders", "annotations_only")
VALID_DATA_VALUES = "'synthetic' or the path of a folder holding Stanford Cars (or class-per-folder images)"
_INNER_FOLDER_NAMES = {"devkit", "car_devkit", "cars_train", "cars_test"}  # users point here by mistake


# ------------------------------------------------------------------------------------------------------------
# Detection


def _candidate_roots(path: Path) -> list[Path]:
    sub = path / _TORCHVISION_SUBDIR
    return [path, sub] if sub.is_dir() else [path]


def _check_folder(path: str | Path) -> Path:
    """The data folder, resolved; a DataError when it does not exist, is a file, is unreadable or empty."""
    raw = str(path)
    if not raw.strip():
        raise DataError(f"The data path is empty; valid values for data: {VALID_DATA_VALUES}.")
    p = Path(raw).expanduser()
    if not p.exists():
        raise DataError(f"Data path {raw!r} does not exist (resolved to {p.absolute()}); valid values for "
                        f"data: {VALID_DATA_VALUES}.")
    if not p.is_dir():
        raise DataError(f"Data path {p} is a file; expected a folder ({VALID_DATA_VALUES}).")
    if not _scan(p):
        raise DataError(f"Data folder {p} is empty; expected Stanford Cars in one of the layouts "
                        f"{', '.join(LAYOUTS)} (see docs/data.md).")
    return p.resolve()


def detect_layout(path: str | Path) -> tuple[str, Path]:
    """(layout name, resolved root) of the data under `path`.

    `path` may also be torchvision's root, which holds the data in stanford_cars/. Layouts are tried in the
    order of `LAYOUTS`; when none matches, a DataError lists what was looked for where and what was found.
    """
    path = _check_folder(path)
    roots = _candidate_roots(path)
    devkits = [_find_devkit(r) for r in roots]
    kaggles = [_find_kaggle(r) for r in roots]
    for dk in devkits:
        if dk.has_annotations and dk.images:
            return "devkit", dk.root
    for kg in kaggles:
        if kg.has_annotations and kg.split_base is not None:
            return "kaggle_folders", kg.root
    for ancestor in (path.parent, path.parent.parent):
        # Pointed at car_data/ or car_data/car_data/ of a Kaggle copy: its CSVs are above, and without them
        # the folders would be read as class_folders with the wrong (sorted-folder) ids.
        kg = _find_kaggle(ancestor)
        base = kg.split_base
        if kg.has_annotations and base is not None and path in (base, *base.parents):
            return "kaggle_folders", ancestor
    for root in roots:
        if _class_folder_splits(root) is not None:
            return "class_folders", root
    for dk, kg in zip(devkits, kaggles, strict=True):
        if dk.has_annotations or kg.has_annotations:
            return "annotations_only", dk.root
    raise DataError(_nothing_matches(path, roots, devkits, kaggles))


def _nothing_matches(
    path: Path, roots: list[Path], devkits: list[_DevkitFiles], kaggles: list[_KaggleFiles]
) -> str:
    where = " and ".join(str(r) for r in roots)
    found_dk = ", ".join(sorted({f for d in devkits for f in d.found()})) or "nothing"
    found_kg = ", ".join(sorted({f for k in kaggles for f in k.found()})) or "nothing"
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in _scan(path))
    shown = ", ".join(entries[:12]) + (f", ... ({len(entries)} entries)" if len(entries) > 12 else "")
    hint = ""
    if path.name in _INNER_FOLDER_NAMES:
        hint = f" {path.name}/ is a folder inside a dataset: point data at the folder that contains it."
    return (
        f"No supported dataset layout found under {path}. Looked in {where} for:\n"
        f"  - devkit: devkit/cars_meta.mat with devkit/cars_train_annos.mat and/or "
        f"cars_test_annos_withlabels.mat (next to devkit/ or inside it), plus image folders cars_train/ "
        f"and/or cars_test/ (or cars_train/cars_train/); found: {found_dk}\n"
        f"  - kaggle_folders: names.csv with anno_train.csv and/or anno_test.csv, plus train/<class>/ "
        f"and/or test/<class>/ image folders in car_data/car_data/, car_data/ or the folder itself; "
        f"found: {found_kg}\n"
        f"  - class_folders: train/<class>/<image> and/or test/<class>/<image> (same places), or "
        f"<class>/<image> directly in the folder; image extensions {', '.join(sorted(IMAGE_EXTENSIONS))}\n"
        f"  - annotations_only: the devkit .mat files (cars_meta.mat + an annotation file) or names.csv + "
        f"anno_*.csv, without images\n"
        f"The folder holds: {shown}.{hint} See docs/data.md for the layouts and where to get the data."
    )


# ------------------------------------------------------------------------------------------------------------
# Readers


def load_dataset(path: str | Path) -> Dataset:
    """Detect the layout under `path` and read it. Raises DataError listing what was looked for where when
    nothing matches."""
    layout, root = detect_layout(path)
    readers = {"devkit": read_devkit, "kaggle_folders": read_kaggle_folders,
               "class_folders": read_class_folders, "annotations_only": read_annotations_only}
    return readers[layout](root)


def read_annotations_only(root: Path) -> Dataset:
    """Annotations with no images on disk (the devkit .mat files, else the Kaggle CSVs): `has_images=False`,
    `path=""`; enough for class statistics."""
    root = Path(root).expanduser().resolve()  # table paths are absolute
    devkit = _find_devkit(root)
    if devkit.has_annotations:
        class_names, parts, notes = _devkit_parts(devkit)
    else:
        kaggle = _find_kaggle(root)
        if not kaggle.has_annotations:
            raise DataError(f"No annotation files under {root}; expected devkit/cars_meta.mat with "
                            f"devkit/cars_train_annos.mat, or names.csv with anno_train.csv / anno_test.csv")
        class_names, parts = _kaggle_parts(kaggle)
        notes = [f"Test split omitted: no anno_test.csv in {root}."] if "test" not in kaggle.annos else []
    notes.append("Annotations only: there are no image files, so only annotation statistics are available.")
    return Dataset(_frame(parts, class_names, None), class_names, "annotations_only", root, False, notes)
