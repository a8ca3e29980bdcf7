"""The devkit layout (torchvision's StanfordCars): devkit/*.mat annotations + cars_train/, cars_test/ images.

Reads the MATLAB files (cars_meta.mat, cars_train_annos.mat, cars_test_annos[_withlabels].mat, with the devkit's
uint8/uint16 integer quirk) into `_Annotations`, and `read_devkit` reads the whole layout into a `Dataset`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.io

from carsml.data.readers_annotations import _Annotations, _check_class_ids, _frame, _validated_names
from carsml.data.readers_files import _TORCHVISION_SUBDIR, _check_images_exist, _DevkitFiles, _find_devkit
from carsml.data.table import SPLITS, Dataset
from carsml.errors import DataError

_BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
_LABELLED_FIELDS = (*_BOX_FIELDS, "class", "fname")
_UNLABELLED_FIELDS = (*_BOX_FIELDS, "fname")


def _load_mat(path: Path, variable: str) -> np.ndarray:
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError... for a file that is not a .mat
        raise DataError(f"{path}: cannot be read as a MATLAB .mat file ({type(exc).__name__}: {exc}); "
                        f"expected the Stanford Cars devkit file") from exc
    if variable not in mat:
        found = sorted(k for k in mat if not k.startswith("__")) or "none"
        raise DataError(f"{path}: no variable {variable!r} (variables found: {found}); expected {variable!r}")
    return np.atleast_1d(mat[variable])  # a one-entry struct array squeezes to 0-d


def _read_meta(path: Path) -> list[str]:
    """Class names from cars_meta.mat: `class_names[i]` is class id i + 1."""
    names = _load_mat(path, "class_names")
    if names.dtype.names is not None or names.ndim != 1 or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'class_names' is a {names.dtype} array of shape {names.shape}; expected a "
                        f"list of class name strings")
    return _validated_names([str(n).strip() for n in names], path)


def _int_column(values: np.ndarray, path: Path, name: str, fnames: np.ndarray) -> np.ndarray:
    """An integer field of a struct array as int64. The devkit stores each value as uint8 or uint16
    depending on its size, so convert before any arithmetic (uint8 39 - 40 wraps to 255)."""
    try:
        floats = values.astype(np.float64)
        ok = bool(np.all(np.isfinite(floats)) and np.all(floats == np.rint(floats)))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        for i, v in enumerate(values):
            number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            if not (number and float(v).is_integer()):
                raise DataError(f"{path}: row {i + 1} ({fnames[i]}): field {name!r} is {v!r}; expected an "
                                f"integer")
        raise DataError(f"{path}: field {name!r} holds non-integer values; expected integers")
    return floats.astype(np.int64)


def _read_mat_annotations(path: Path, split: str, labelled: bool) -> _Annotations:
    """cars_train_annos.mat or cars_test_annos_withlabels.mat (labelled), cars_test_annos.mat (not)."""
    ann = _load_mat(path, "annotations")
    expected = _LABELLED_FIELDS if labelled else _UNLABELLED_FIELDS
    found = ann.dtype.names or ()
    missing = [f for f in expected if f not in found]
    if missing:
        raise DataError(f"{path}: 'annotations' has fields {list(found)}; expected {list(expected)} "
                        f"(missing {missing})")
    fnames = np.array([str(f).strip() for f in ann["fname"]], dtype=object)
    boxes = np.stack([_int_column(ann[f], path, f, fnames) for f in _BOX_FIELDS], axis=1)
    cls = _int_column(ann["class"], path, "class", fnames) if labelled else None
    return _Annotations(path, split, fnames, cls, boxes, np.arange(1, len(fnames) + 1))


def _devkit_parts(files: _DevkitFiles) -> tuple[list[str], list[_Annotations], list[str]]:
    """Class names, labelled annotation parts and notes of a devkit (with or without images)."""
    if files.meta is None:
        raise DataError(f"No cars_meta.mat in {files.root / 'devkit'}; expected the devkit's class names "
                        f"there.")
    class_names = _read_meta(files.meta)
    parts = [_read_mat_annotations(files.annos[s], s, labelled=True) for s in SPLITS if s in files.annos]
    notes = []
    if "test" not in files.annos:
        if files.test_unlabelled is not None:
            notes.append(f"Test split omitted: {files.test_unlabelled} has no class labels (the test labels "
                         f"were once private). Put cars_test_annos_withlabels.mat in {files.root} (or in "
                         f"devkit/) to include it.")
        else:
            notes.append(f"Test split omitted: no cars_test_annos_withlabels.mat in {files.root} or devkit/.")
    if "train" not in files.annos:
        notes.append(f"Train split omitted: no devkit/cars_train_annos.mat in {files.root}.")
    if not parts:
        raise DataError(f"{files.root}: no labelled annotation file; expected devkit/cars_train_annos.mat "
                        f"and/or cars_test_annos_withlabels.mat")
    _check_class_ids(parts, len(class_names), files.meta)
    return class_names, parts, notes


def read_devkit(root: Path) -> Dataset:
    """The devkit layout (torchvision's StanfordCars): devkit/*.mat, cars_train/ and cars_test/ images.

    `root` may be the folder holding devkit/ or torchvision's root (holding stanford_cars/). Without test
    labels (only cars_test_annos.mat) the test split is left out and a note in `Dataset.notes` says so.
    """
    root = Path(root).expanduser().resolve()  # table paths are absolute
    files = _find_devkit(root)
    if files.meta is None and (root / _TORCHVISION_SUBDIR).is_dir():
        files = _find_devkit(root / _TORCHVISION_SUBDIR)
    class_names, parts, notes = _devkit_parts(files)
    paths = []
    for part in parts:
        folder = files.images.get(part.split)
        if folder is None:
            raise DataError(f"{part.source} lists {len(part.fname)} {part.split} images but there is no "
                            f"image folder {files.root / f'cars_{part.split}'}/; expected the images there")
        _check_images_exist(folder, part.fname, part.source, part.split)
        paths.append(np.array([os.path.join(folder, f) for f in part.fname], dtype=object))
    return Dataset(_frame(parts, class_names, paths), class_names, "devkit", files.root, True, notes)
