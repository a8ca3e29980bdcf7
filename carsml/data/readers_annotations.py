"""Annotations as parallel arrays (one entry per image), shared by the devkit .mat and Kaggle CSV readers.

`_Annotations` holds one annotation file; `_frame` stacks labelled ones into the standard table after the class ids
are checked against the class names (`_check_class_ids`, `_validated_names`). Annotation files use 1-based class ids
and 1-based inclusive boxes; the table (carsml/data/table.py) has 0-based labels and 0-based boxes with x2/y2
exclusive, i.e. (x1 - 1, y1 - 1, x2, y2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from carsml.data.table import make_table
from carsml.errors import DataError

_SHOW = 5  # how many offending items an error lists


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
