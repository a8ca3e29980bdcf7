"""The Kaggle "stanford-car-dataset-by-classes-folder" layout: names.csv, anno_{train,test}.csv and class folders.

Reads the CSV files (a UTF-8 BOM, CRLF line endings and a header row are fine) into class names and
`_Annotations`, and `read_kaggle_folders` reads the whole layout into a `Dataset`, labelled by the CSV class ids.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from carsml.data.readers_annotations import _Annotations, _check_class_ids, _frame, _listed, _validated_names
from carsml.data.readers_files import _check_images_exist, _find_kaggle, _image_files, _KaggleFiles, _visible_dirs
from carsml.data.table import SPLITS, Dataset
from carsml.errors import DataError


def _read_rows(path: Path, expected: str, *, keep_blank: bool = False) -> list[tuple[int, list[str]]]:
    """CSV rows with their 1-based line numbers; a UTF-8 BOM and CRLF line endings are fine.

    Blank rows are dropped unless `keep_blank` (then only trailing ones are). A zero-byte file, a file that is not
    UTF-8 (naming the line) and a malformed CSV raise DataError naming the file and `expected` (what a line holds).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); expected a CSV file of {expected}") from exc
    if not data:
        raise DataError(f"{path}: the file is empty (0 bytes); expected a CSV file of {expected}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at character "
            f"{exc.start - line_start + 1}); expected a UTF-8 CSV file of {expected}. Re-save it as UTF-8 (e.g. "
            f"`iconv -f latin1 -t utf-8`)"
        ) from None
    try:
        rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1)]
    except csv.Error as exc:
        raise DataError(f"{path}: cannot be read as a CSV file ({exc}); expected a CSV file of {expected}") from exc
    if keep_blank:
        while rows and not any(rows[-1][1]):
            rows.pop()
        return rows
    return [(n, row) for n, row in rows if any(row)]


def read_names_csv(path: Path) -> list[str]:
    """Kaggle names.csv: line i (1-based) is the name of class id i; no header. Blank lines inside the file are
    empty names (an error: dropping them would shift the ids); trailing ones are ignored."""
    rows = _read_rows(path, "class names, one per line (line i names class id i)", keep_blank=True)
    return _validated_names([",".join(row) for _, row in rows], path, [f"line {n}" for n, _ in rows])


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _read_anno_csv(path: Path, split: str) -> _Annotations:
    """Kaggle anno_train.csv / anno_test.csv: `fname,x1,y1,x2,y2,class` (1-based), with or without a
    header row."""
    rows = _read_rows(path, "annotation lines 'fname,x1,y1,x2,y2,class'")
    header = bool(rows) and len(rows[0][1]) > 1 and not _is_int(rows[0][1][1])
    if header:
        rows = rows[1:]  # a header such as "image_name,x_min,y_min,x_max,y_max,label" (some copies add one)
    if not rows:
        what = "only a header line and no annotation rows" if header else "no annotation rows"
        raise DataError(f"{path}: {what}; expected at least one line 'fname,x1,y1,x2,y2,class'")
    values = np.zeros((len(rows), 5), dtype=np.int64)
    for k, (line, row) in enumerate(rows):
        if len(row) != 6:
            raise DataError(f"{path}, line {line}: {len(row)} fields {row}; expected 6: "
                            f"fname,x1,y1,x2,y2,class")
        for j, cell in enumerate(row[1:]):
            if not _is_int(cell):
                column = ("x1", "y1", "x2", "y2", "class")[j]
                raise DataError(f"{path}, line {line} ({row[0]}): {column} is {cell!r}; expected an integer")
            values[k, j] = int(cell)
    fnames = np.array([row[0] for _, row in rows], dtype=object)
    lines = np.array([line for line, _ in rows])
    return _Annotations(path, split, fnames, values[:, 4].copy(), values[:, :4].copy(), lines, "line")


def _kaggle_parts(files: _KaggleFiles) -> tuple[list[str], list[_Annotations]]:
    if files.names is None:
        raise DataError(f"No names.csv in {files.root}; expected the class names file there.")
    class_names = read_names_csv(files.names)
    parts = [_read_anno_csv(files.annos[s], s) for s in SPLITS if s in files.annos]
    if not parts:
        raise DataError(f"No anno_train.csv or anno_test.csv in {files.root}; expected the annotation CSVs.")
    _check_class_ids(parts, len(class_names), files.names)
    return class_names, parts


def class_folder(class_name: str) -> str:
    """A class's image folder (Kaggle's, and the real dev set's): its name with "/" (not allowed in a folder name) as
    "-"."""
    return class_name.replace("/", "-")


def _class_folder_names(class_names: list[str], source: Path) -> list[str]:
    """The Kaggle image folder of each class: its name with "/" (not allowed in a folder name) as "-".

    Raises DataError naming `source` (names.csv, whose line i names class id i) and the classes when two names give
    the same folder: their images would mix.
    """
    folders = [class_folder(n) for n in class_names]
    ids: dict[str, list[int]] = {}
    for i, folder in enumerate(folders, 1):
        ids.setdefault(folder, []).append(i)
    clashes = [" and ".join(f"{class_names[i - 1]!r} (line {i})" for i in group) + f" -> {folder!r}"
               for folder, group in ids.items() if len(group) > 1]
    if clashes:
        raise DataError(f"{source}: {len(clashes)} group(s) of class names give the same image folder once '/' "
                        f"becomes '-': {_listed(clashes)}; expected distinct folder names (rename one of each group)")
    return folders


def read_kaggle_folders(root: Path) -> Dataset:
    """Kaggle "stanford-car-dataset-by-classes-folder": names.csv, anno_{train,test}.csv and images in
    {train,test}/<class name, "/" -> "-">/<fname> under car_data/car_data/ (or car_data/, or the root).

    Labels come from the CSV class column (ids into names.csv), never from the sorted folder order, which
    differs from the official ids for 143 of the 196 classes.
    """
    files = _find_kaggle(Path(root).expanduser().resolve())
    class_names, parts = _kaggle_parts(files)
    base = files.split_base
    if base is None:
        raise DataError(f"No train/ or test/ image folder under {files.root} (looked in car_data/car_data/, "
                        f"car_data/ and the folder itself)")
    folders = np.array(_class_folder_names(class_names, files.names), dtype=object)
    paths, notes = [], []
    for part in parts:
        split_dir = base / part.split
        if not split_dir.is_dir():
            raise DataError(f"{part.source} lists {len(part.fname)} {part.split} images but there is no "
                            f"folder {split_dir}/; expected {part.split}/<class name>/<fname> there")
        assert part.cls is not None
        rel = folders[part.cls - 1] + "/" + part.fname
        _check_images_exist(split_dir, rel, part.source, part.split)
        paths.append(np.array([os.path.join(split_dir, r) for r in rel], dtype=object))
        extra = sum(len(_image_files(d)) for d in _visible_dirs(split_dir)) - len(set(rel))
        if extra > 0:
            notes.append(f"{extra} image(s) under {split_dir} are not listed in {part.source.name} and "
                         f"were left out.")
    return Dataset(_frame(parts, class_names, paths), class_names, "kaggle_folders", files.root, True, notes)
