"""Stratified splits: reproducible, disjoint, stratified; bad k named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from carsml.data.splits import kfold_splits, membership_table, train_val_split
from carsml.errors import ConfigError

LABELS = np.repeat(np.arange(5), [10, 12, 8, 20, 6])


def test_train_val_split_is_stratified_disjoint_and_seeded() -> None:
    tr, va = train_val_split(LABELS, 0.25, seed=1)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(LABELS)
    assert set(LABELS[va]) == set(range(5)) and set(LABELS[tr]) == set(range(5))
    share = np.bincount(LABELS[va]) / np.bincount(LABELS)
    assert np.all(np.abs(share - 0.25) < 0.15)
    assert np.array_equal(va, train_val_split(LABELS, 0.25, seed=1)[1])
    assert not np.array_equal(va, train_val_split(LABELS, 0.25, seed=2)[1])


def test_kfold_covers_every_sample_once() -> None:
    folds = kfold_splits(LABELS, 3, seed=0)
    held_out = np.concatenate([va for _, va in folds])
    assert sorted(held_out) == list(range(len(LABELS)))
    for tr, va in folds:
        assert not set(tr) & set(va) and set(LABELS[va]) == set(range(5))


@pytest.mark.parametrize("k, fragment", [(1, "at least 2"), (7, "smallest class \\(6")])
def test_bad_k(k: int, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        kfold_splits(LABELS, k, seed=0)


def test_bad_val_fraction() -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        train_val_split(LABELS, 1.5, seed=0)
    with pytest.raises(ConfigError, match="single training image"):
        train_val_split(np.array([0, 0, 1]), 0.3, seed=0)


def test_membership_table_roles() -> None:
    fnames = pd.Series([f"{i:05d}.jpg" for i in range(len(LABELS))])
    tr, va = train_val_split(LABELS, 0.2, seed=0)
    table = membership_table(fnames, {"train": tr, "val": va})
    assert len(table) == len(LABELS) and table.groupby("role").size().to_dict() == {"train": len(tr), "val": len(va)}
