"""The class_folders layout: {train,test}/<class>/<image> (or <class>/<image>) without annotation files."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from carsml.data.images import image_size
from carsml.data.readers_files import _class_folder_splits, _find_devkit, _find_kaggle, _image_files, _visible_dirs
from carsml.data.table import Dataset, make_table
from carsml.errors import DataError


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
