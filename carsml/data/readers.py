"""Readers: the common ways of storing Stanford Cars (or any class-per-folder collection) -> one `Dataset`.

Layouts (trees and quirks in docs/data.md):
    devkit            torchvision's StanfordCars: devkit/*.mat annotations + cars_train/, cars_test/ images
    kaggle_folders    Kaggle "stanford-car-dataset-by-classes-folder": names.csv, anno_*.csv and
                      {train,test}/<class name>/<fname> image folders
    class_folders     {train,test}/<class>/<image> (or <class>/<image>) without annotation files
    annotations_only  the devkit .mat files or the Kaggle CSVs with no images on disk (statistics only)

Annotation files use 1-based class ids and 1-based inclusive boxes; the table (carsml/data/table.py) has
0-based labels and 0-based boxes with x2/y2 exclusive, i.e. (x1 - 1, y1 - 1, x2, y2).
"""

from __future__ import annotations

import csv
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from carsml.data.images import image_size
from carsml.data.table import SPLITS, Dataset, make_table
from carsml.errors import DataError

LAYOUTS = ("devkit", "kaggle_folders", "class_folders", "annotations_only")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
VALID_DATA_VALUES = "'synthetic' or the path of a folder holding Stanford Cars (or class-per-folder images)"

_BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
_LABELLED_FIELDS = (*_BOX_FIELDS, "class", "fname")
_UNLABELLED_FIELDS = (*_BOX_FIELDS, "fname")
_TORCHVISION_SUBDIR = "stanford_cars"  # torchvision's root holds the data one level down
# Where {train,test}/ live relative to the root (the Kaggle download unpacks to car_data/car_data/).
_SPLIT_BASES = (("car_data", "car_data"), ("car_data",), ())
_DEVKIT_IMAGE_DIRS = {"cars_train", "cars_test"}
_SKIPPED_DIR_NAMES = {"__MACOSX"}
_INNER_FOLDER_NAMES = {"devkit", "car_devkit", "cars_train", "cars_test"}  # users point here by mistake
_SHOW = 5  # how many offending items an error lists


# ------------------------------------------------------------------------------------------------------------
# Annotations as parallel arrays (one entry per image), shared by the .mat and CSV readers


@dataclass
class _Annotations:
    """One annotation file: 1-based class ids (None when unlabelled) and 1-based inclusive boxes."""

    source: Path
    split: str
    fname: np.ndarray  # object array of str
    cls: np.ndarray | None  # int64, 1-based
    boxes: np.ndarray  # int64 (N, 4): x1, y1, x2, y2 as stored
    row_numbers: np.ndarray  # 1-based row (.mat) or line (CSV) of each entry, for messages
    row_word: str = "row"

    def where(self, i: int) -> str:
        return f"{self.source}, {self.row_word} {int(self.row_numbers[i])} ({self.fname[i]})"


def _table_boxes(ann: _Annotations) -> dict[str, np.ndarray]:
    """0-based exclusive boxes clipped to >= 0 (the image size is unknown here; crops clip to the image)."""
    x1, y1, x2, y2 = (ann.boxes[:, i] for i in range(4))
    out = {"x1": np.maximum(x1 - 1, 0), "y1": np.maximum(y1 - 1, 0),
           "x2": np.maximum(x2, 0), "y2": np.maximum(y2, 0)}
    bad = np.flatnonzero((out["x2"] <= out["x1"]) | (out["y2"] <= out["y1"]))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{ann.where(i)}: box (x1, y1, x2, y2) = {tuple(int(v) for v in ann.boxes[i])} is empty; "
            f"expected 1-based inclusive pixel coordinates with x1 <= x2 and y1 <= y2 ({bad.size} such "
            f"row(s))"
        )
    return out


def _out_of_range(part: _Annotations, i: int, num_names: int, names_file: Path) -> DataError:
    return DataError(f"{part.where(i)}: class {int(part.cls[i])} is out of range; expected 1..{num_names} "
                     f"(1-based ids into the {num_names} names of {names_file.name})")


def _check_class_ids(parts: list[_Annotations], num_names: int, names_file: Path) -> None:
    """Every class id must name a class: 1..C with C = the number of names in `names_file`, and the names
    file must have exactly as many names as the annotations have class ids."""
    labelled = [p for p in parts if p.cls is not None and len(p.cls)]
    if not labelled:
        return
    for part in labelled:
        low = np.flatnonzero(part.cls < 1)
        if low.size:
            raise _out_of_range(part, int(low[0]), num_names, names_file)
    used = np.unique(np.concatenate([p.cls for p in labelled]))
    top = int(used[-1])
    # When ids 1..top all occur, the names file (not a stray row) has the wrong length.
    if top > num_names and len(used) != top:
        for part in labelled:
            high = np.flatnonzero(part.cls > num_names)
            if high.size:
                raise _out_of_range(part, int(high[0]), num_names, names_file)
    if top != num_names:
        sources = " and ".join(p.source.name for p in labelled)
        raise DataError(
            f"{names_file} lists {num_names} class names but {sources} use class ids 1..{top}; expected "
            f"one name per class id ({top} names). Is it the names file of another copy, or has it a header?"
        )


def _frame(parts: list[_Annotations], class_names: list[str], paths: list[np.ndarray] | None) -> pd.DataFrame:
    """Stack labelled annotation parts into the standard table (path "" when there are no images)."""
    names = np.asarray(class_names, dtype=object)
    frames = []
    for k, part in enumerate(parts):
        assert part.cls is not None
        labels = part.cls - 1
        n = len(labels)
        frames.append(pd.DataFrame({
            "path": paths[k] if paths is not None else np.full(n, "", dtype=object),
            "label": labels, "class_name": names[labels], **_table_boxes(part),
            "split": np.full(n, part.split, dtype=object), "fname": part.fname,
        }))
    return make_table(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())


# ------------------------------------------------------------------------------------------------------------
# .mat files (devkit)


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


# ------------------------------------------------------------------------------------------------------------
# CSV files (Kaggle)


def _validated_names(names: list[str], source: Path, where: list[str] | None = None) -> list[str]:
    """`names` (class id i + 1 at index i) when every name is non-empty and distinct; else one DataError naming
    `source` and every offending entry. `where[i]` says where name i is in the file (default "entry i + 1")."""
    if not names:
        raise DataError(f"{source}: no class names; expected one name per class id")
    where = where or [f"entry {i}" for i in range(1, len(names) + 1)]
    empty = [where[i] for i, name in enumerate(names) if not name]
    if empty:
        raise DataError(f"{source}: {len(empty)} empty class name(s), at {_listed(empty)}; expected one "
                        f"non-empty name per class id (a blank line shifts every later class id)")
    positions: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        positions.setdefault(name, []).append(where[i])
    duplicates = [f"{name!r} ({' and '.join(at)})" for name, at in positions.items() if len(at) > 1]
    if duplicates:
        raise DataError(f"{source}: {len(duplicates)} class name(s) occur more than once: {_listed(duplicates)}; "
                        f"expected distinct names, one per class id")
    return names


def _listed(items: list[str]) -> str:
    """The first `_SHOW` items, comma-separated, with a count of the rest."""
    more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


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


# ------------------------------------------------------------------------------------------------------------
# Locating files


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


# ------------------------------------------------------------------------------------------------------------
# Detection


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


def _kaggle_parts(files: _KaggleFiles) -> tuple[list[str], list[_Annotations]]:
    if files.names is None:
        raise DataError(f"No names.csv in {files.root}; expected the class names file there.")
    class_names = read_names_csv(files.names)
    parts = [_read_anno_csv(files.annos[s], s) for s in SPLITS if s in files.annos]
    if not parts:
        raise DataError(f"No anno_train.csv or anno_test.csv in {files.root}; expected the annotation CSVs.")
    _check_class_ids(parts, len(class_names), files.names)
    return class_names, parts


def _class_folder_names(class_names: list[str], source: Path) -> list[str]:
    """The Kaggle image folder of each class: its name with "/" (not allowed in a folder name) as "-".

    Raises DataError naming `source` (names.csv, whose line i names class id i) and the classes when two names give
    the same folder: their images would mix.
    """
    folders = [n.replace("/", "-") for n in class_names]
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


def read_class_folders(root: Path) -> Dataset:
    """{train,test}/<class>/<image> (under car_data/car_data/, car_data/ or `root`), or <class>/<image>
    directly in `root` (all train). Classes are the folder names, sorted; each box is the whole image, its
    size read from the header (EXIF orientation applied)."""
    root = Path(root).expanduser().resolve()  # table paths are absolute
    splits = _class_folder_splits(root)
    if splits is None:
        raise DataError(f"No class folders with images under {root}; expected train/<class>/<image>, "
                        f"test/<class>/<image> or <class>/<image>")
    listing: list[tuple[str, str, Path]] = []  # (split, class, file)
    notes = []
    for split, folder in splits.items():
        loose = len(_image_files(folder))
        if loose:
            notes.append(f"{loose} image(s) directly in {folder} (not in a class folder) were left out.")
        for class_dir in _visible_dirs(folder):
            images = _image_files(class_dir)
            if not images:
                notes.append(f"{class_dir} has no images and was left out.")
            listing += [(split, class_dir.name, class_dir / name) for name in images]
    class_names = sorted({c for _, c, _ in listing})
    index = {c: i for i, c in enumerate(class_names)}
    # Header reads are I/O bound; threads hide the latency of cold or network disks.
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        sizes = list(pool.map(image_size, [p for _, _, p in listing]))
    rows = [{"path": str(p), "label": index[c], "class_name": c, "x1": 0, "y1": 0, "x2": w, "y2": h,
             "split": s, "fname": p.name} for (s, c, p), (w, h) in zip(listing, sizes, strict=True)]
    notes.insert(0, f"class_folders: labels follow the sorted folder names ({len(class_names)} classes) and "
                    f"each box is the whole image.")
    if _find_devkit(root).has_annotations or _find_kaggle(root).has_annotations:
        notes.append("Annotation files were found but cannot be matched to these folders; docs/data.md shows "
                     "the devkit and kaggle_folders layouts, which use the official class ids and boxes.")
    return Dataset(make_table(rows), class_names, "class_folders", root, True, notes)


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
