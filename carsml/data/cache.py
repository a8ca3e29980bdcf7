"""Decoded-image cache: decode, convert to RGB, crop to the box, resize once; store uint8 arrays on disk.

JPEG decoding every epoch is the classic bottleneck (5 folds x 25 epochs decode every image 125 times). Here each image
is decoded once per (files, crop, size) and later epochs, folds and experiments memory-map the stored array.

Layout: `<cache_dir>/decoded/<digest>/images.npy` (N x S x S x 3 uint8) and `meta.json`, written last. A folder
without meta.json, or whose file size or checksum disagrees with meta.json, is partial or corrupt and gets rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from carsml.data.images import load_crop
from carsml.errors import DataError

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """`$CARSML_CACHE`, else the user's cache dir (`$XDG_CACHE_HOME/carsml` or `~/.cache/carsml`)."""
    if os.environ.get("CARSML_CACHE"):
        return Path(os.environ["CARSML_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "carsml"


@dataclass
class DecodedImages:
    """Decoded crops (memory-mapped), their labels and the table rows they came from."""

    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64
    table: pd.DataFrame  # the rows kept, in the same order
    digest: str
    path: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable images skipped


def cache_key(table: pd.DataFrame, image_size: int, use_boxes: bool, margin: float) -> str:
    """Digest of the files (path, size, mtime), boxes and crop/resize settings."""
    h = hashlib.sha256(f"v{CACHE_FORMAT}|{image_size}|{use_boxes}|{margin:.6f}".encode())
    for row in table[["path", "x1", "y1", "x2", "y2"]].itertuples(index=False):
        try:
            st = os.stat(row.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{row.path}|{stamp}|{row.x1},{row.y1},{row.x2},{row.y2}\n".encode())
    return h.hexdigest()[:24]


def _file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_existing(folder: Path, table: pd.DataFrame, image_size: int) -> DecodedImages | None:
    """Open a complete cache folder, or return None when it is partial or corrupt."""
    meta_path, array_path = folder / "meta.json", folder / "images.npy"
    if not (meta_path.is_file() and array_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="r")
        if images.shape != (meta["n"], image_size, image_size, 3) or images.dtype != np.uint8:
            return None
        if _file_checksum(array_path) != meta["checksum"]:
            return None
    except (OSError, ValueError, KeyError):
        return None
    skipped = [tuple(s) for s in meta["skipped"]]
    kept = table[~table["path"].isin({p for p, _ in skipped})].reset_index(drop=True)
    if len(kept) != meta["n"]:
        return None
    return DecodedImages(images, kept["label"].to_numpy(np.int64), kept, meta["digest"], folder, skipped)


def build_cache(
    table: pd.DataFrame,
    image_size: int,
    *,
    cache_dir: Path | None = None,
    use_boxes: bool = True,
    margin: float = 0.0,
    skip_unreadable: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DecodedImages:
    """Decoded uint8 crops for every row of `table`, built on first use and memory-mapped afterwards.

    Missing files are reported before any decoding. Images that fail to decode raise one DataError listing them all,
    unless `skip_unreadable`, in which case they are left out and returned in `DecodedImages.skipped`.
    """
    if table.empty:
        raise DataError("No images to decode: the dataset table is empty.")
    if (table["path"] == "").any():
        raise DataError("This dataset has annotations but no image files on disk; training needs the images.")
    missing = [p for p in table["path"] if not os.path.isfile(p)]
    if missing and not skip_unreadable:
        shown = "\n  ".join(missing[:5])
        raise DataError(f"{len(missing)} image file(s) listed in the annotations are missing, e.g.:\n  {shown}")

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    digest = cache_key(table, image_size, use_boxes, margin)
    folder = cache_dir / "decoded" / digest
    existing = _load_existing(folder, table, image_size)
    if existing is not None:
        return existing

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=folder.parent))
    try:
        array = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(table), image_size, image_size, 3))
        failures: dict[int, str] = {}
        rows = list(table[["path", "x1", "y1", "x2", "y2"]].itertuples(index=False))

        def decode(i: int) -> None:
            path, x1, y1, x2, y2 = rows[i]
            try:
                array[i] = load_crop(path, (x1, y1, x2, y2) if use_boxes else None, image_size, margin)
            except DataError as exc:
                failures[i] = str(exc)

        done = 0
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            for _ in pool.map(decode, range(len(rows))):
                done += 1
                if progress is not None:
                    progress(done, len(rows))
        if failures and not skip_unreadable:
            lines = "\n  ".join(failures[i] for i in sorted(failures)[:10])
            raise DataError(
                f"{len(failures)} image(s) could not be decoded (pass skip_unreadable=true to skip and record them):\n"
                f"  {lines}"
            )
        keep = np.array(sorted(set(range(len(rows))) - set(failures)), dtype=np.int64)
        if len(keep) < len(rows):  # compact: rewrite without the failed rows
            kept_array = np.lib.format.open_memmap(tmp / "kept.npy", mode="w+", dtype=np.uint8,
                                                   shape=(len(keep), image_size, image_size, 3))
            kept_array[:] = array[keep]
            kept_array.flush()
            del array, kept_array
            os.replace(tmp / "kept.npy", tmp / "images.npy")
        else:
            array.flush()
            del array
        skipped = [(rows[i][0], failures[i]) for i in sorted(failures)]
        meta = {"n": int(len(keep)), "digest": digest, "image_size": image_size, "use_boxes": use_boxes,
                "margin": margin, "skipped": skipped, "checksum": _file_checksum(tmp / "images.npy"),
                "format": CACHE_FORMAT}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if folder.exists():
            if _load_existing(folder, table, image_size) is not None:  # another process published it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                return _load_existing(folder, table, image_size)
            shutil.rmtree(folder)  # a partial or corrupt earlier attempt
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = _load_existing(folder, table, image_size)
    if result is None:  # pragma: no cover - only on a concurrent writer clobbering the folder
        raise DataError(f"Decoded cache at {folder} could not be read back after writing.")
    return result
