"""The one dataset table every reader produces and everything downstream consumes.

Columns (one row per image):
    path        absolute path of the image file, or "" when only annotations are available
    label       0-based class index into `Dataset.class_names`
    class_name  human-readable class name
    x1, y1      top-left corner of the box, 0-based, inclusive
    x2, y2      bottom-right corner, 0-based, exclusive (a PIL crop box); clipped to >= 0 and, where the
                image size is known, to the image size. The devkit's 1-based inclusive (x1, y1, x2, y2)
                becomes (x1 - 1, y1 - 1, x2, y2).
    split       "train" or "test" (the official split; validation is carved out of train later)
    fname       the file name as the annotation files spell it (for reports and reproducibility)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

COLUMNS = ["path", "label", "class_name", "x1", "y1", "x2", "y2", "split", "fname"]
SPLITS = ("train", "test")


@dataclass
class Dataset:
    """A dataset table plus what it was read from."""

    table: pd.DataFrame
    class_names: list[str]
    layout: str  # "devkit", "kaggle_folders", "class_folders", "annotations_only"
    root: Path
    has_images: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one official split, index reset."""
        return self.table[self.table["split"] == name].reset_index(drop=True)

    def digest(self) -> str:
        """A short content digest of the table and class names (identifies the data a run saw)."""
        h = hashlib.sha256()
        h.update("\n".join(self.class_names).encode())
        cols = ["fname", "label", "x1", "y1", "x2", "y2", "split"]
        h.update(pd.util.hash_pandas_object(self.table[cols], index=False).values.tobytes())
        return h.hexdigest()[:16]


def make_table(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Build a table with the standard columns and dtypes from row dicts."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("label", "x1", "y1", "x2", "y2"):
        df[col] = df[col].astype("int64")
    for col in ("path", "class_name", "split", "fname"):
        df[col] = df[col].astype(str)
    return df.reset_index(drop=True)
