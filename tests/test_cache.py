"""Decoded cache: built once from real JPEGs, reused, partial/corrupt caches rebuilt, bad images reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from carsml.data import cache as cache_mod
from carsml.data.cache import build_cache
from carsml.data.images import load_crop
from carsml.data.table import make_table
from carsml.errors import DataError


def _table(shared_data: Path, n: int = 12, tmp: Path | None = None) -> pd.DataFrame:
    index = pd.read_csv(shared_data / "sample" / "sample_index.csv").head(n)
    folder = shared_data / "sample" / "cars_train_bbox_cropped"
    if tmp is not None:  # copies we may damage
        tmp.mkdir(parents=True, exist_ok=True)
        for f in index["fname"]:
            shutil.copy(folder / f, tmp / f)
        folder = tmp
    rows = [{"path": str(folder / r.fname), "label": i % 3, "class_name": r.class_name, "x1": 0, "y1": 0,
             "x2": int(r.crop_width), "y2": int(r.crop_height), "split": "train", "fname": r.fname}
            for i, r in enumerate(index.itertuples(index=False))]
    return make_table(rows)


def test_cache_matches_direct_decoding_and_is_reused(shared_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    table = _table(shared_data)
    first = build_cache(table, 40, cache_dir=tmp_path)
    assert first.images.shape == (12, 40, 40, 3) and first.images.dtype == np.uint8
    assert np.array_equal(first.labels, table["label"].to_numpy())
    direct = load_crop(table.loc[3, "path"], (0, 0, table.loc[3, "x2"], table.loc[3, "y2"]), 40)
    assert np.array_equal(first.images[3], direct)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second build must read the cache, not decode")

    monkeypatch.setattr(cache_mod, "load_crop", no_decoding)
    again = build_cache(table, 40, cache_dir=tmp_path)
    assert again.path == first.path and np.array_equal(np.asarray(again.images), np.asarray(first.images))
    assert isinstance(again.images, np.memmap)


def test_key_depends_on_size_crop_and_files(shared_data: Path, tmp_path: Path) -> None:
    table = _table(shared_data, 4)
    a = build_cache(table, 32, cache_dir=tmp_path)
    assert build_cache(table, 24, cache_dir=tmp_path).digest != a.digest
    assert build_cache(table, 32, cache_dir=tmp_path, margin=0.1).digest != a.digest
    shifted = table.assign(x1=table["x1"] + 5)
    assert build_cache(shifted, 32, cache_dir=tmp_path).digest != a.digest


@pytest.mark.parametrize("damage", ["no_meta", "truncated", "flipped_byte"])
def test_partial_or_corrupt_cache_is_rebuilt(shared_data: Path, tmp_path: Path, damage: str) -> None:
    table = _table(shared_data, 4)
    good = build_cache(table, 32, cache_dir=tmp_path)
    expected = np.array(good.images)
    array_file = good.path / "images.npy"
    del good
    if damage == "no_meta":
        (array_file.parent / "meta.json").unlink()
    elif damage == "truncated":
        data = array_file.read_bytes()
        array_file.write_bytes(data[: len(data) // 2])
    else:
        data = bytearray(array_file.read_bytes())
        data[-10] ^= 0xFF
        array_file.write_bytes(bytes(data))
    rebuilt = build_cache(table, 32, cache_dir=tmp_path)
    assert np.array_equal(np.asarray(rebuilt.images), expected)
    assert json.loads((rebuilt.path / "meta.json").read_text())["n"] == 4


def test_corrupt_jpeg_is_named_and_nothing_half_written(shared_data: Path, tmp_path: Path) -> None:
    table = _table(shared_data, 5, tmp_path / "imgs")
    bad = Path(table.loc[2, "path"])
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    with pytest.raises(DataError, match=bad.name):
        build_cache(table, 32, cache_dir=tmp_path / "cache")
    decoded = tmp_path / "cache" / "decoded"
    assert not any(decoded.iterdir()), "a failed build must leave no cache folder behind"


def test_skip_unreadable_records_every_skipped_file(shared_data: Path, tmp_path: Path) -> None:
    table = _table(shared_data, 6, tmp_path / "imgs")
    for i in (1, 4):
        Path(table.loc[i, "path"]).write_bytes(b"not an image at all")
    result = build_cache(table, 32, cache_dir=tmp_path / "cache", skip_unreadable=True)
    assert len(result.images) == 4 and [Path(p).name for p, _ in result.skipped] == [
        Path(table.loc[1, "path"]).name, Path(table.loc[4, "path"]).name]
    assert list(result.table["fname"]) == [table.loc[i, "fname"] for i in (0, 2, 3, 5)]
    assert np.array_equal(result.labels, table["label"].to_numpy()[[0, 2, 3, 5]])
    reread = build_cache(table, 32, cache_dir=tmp_path / "cache", skip_unreadable=True)
    assert reread.skipped == result.skipped and len(reread.images) == 4


def test_missing_files_are_reported_before_decoding(shared_data: Path, tmp_path: Path) -> None:
    table = _table(shared_data, 3)
    table.loc[1, "path"] = str(tmp_path / "gone.jpg")
    with pytest.raises(DataError, match="(?s)1 image file.*missing.*gone.jpg"):
        build_cache(table, 32, cache_dir=tmp_path)
    with pytest.raises(DataError, match="annotations but no image files"):
        build_cache(table.assign(path=""), 32, cache_dir=tmp_path)
