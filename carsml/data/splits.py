"""Seeded, stratified splits of the official train set. The official test split is never split or used to select."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from carsml.errors import ConfigError


def train_val_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train_idx, val_idx) positions into `labels`; every class keeps at least one training image."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if present.min() < 2:
        cls = int(np.flatnonzero(counts == 1)[0])
        raise ConfigError(f"Class {cls} has a single training image: a stratified validation split needs at least 2.")
    n_val = max(int(round(len(labels) * val_fraction)), len(present))
    if len(labels) - n_val < len(present):
        raise ConfigError(
            f"val_fraction={val_fraction} leaves fewer training images than classes ({len(present)}); lower it."
        )
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(labels)), labels))
    return np.sort(train_idx), np.sort(val_idx)


def kfold_splits(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k folds as (train_idx, val_idx) pairs."""
    if k < 2:
        raise ConfigError(f"folds must be at least 2, got {k}")
    smallest = int(np.bincount(labels)[np.unique(labels)].min())
    if k > smallest:
        raise ConfigError(
            f"folds={k} is larger than the smallest class ({smallest} training images); use folds <= {smallest}"
        )
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(va)) for tr, va in splitter.split(np.zeros(len(labels)), labels)]


def membership_table(fnames: pd.Series, assignments: dict[str, np.ndarray]) -> pd.DataFrame:
    """A `fname, role` table (e.g. role = train/val/test or fold index) saved with the run to reproduce a split."""
    parts = [pd.DataFrame({"fname": fnames.iloc[idx].to_numpy(), "role": role}) for role, idx in assignments.items()]
    return pd.concat(parts, ignore_index=True)
