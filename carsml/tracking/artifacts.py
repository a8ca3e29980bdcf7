"""Artifacts more than one entry point logs the same way (one writer each, so their files look alike everywhere)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from carsml.tracking import figures
from carsml.tracking.runs import log_csv, log_figure


def log_confusion_matrix(counts: np.ndarray, class_names: list[str], split: str, title: str | None) -> None:
    """`tables/confusion_matrix_<split>.csv` (image counts, true class per row) and, with a `title`, the
    row-normalised matrix as `figures/confusion_matrix_<split>.png`."""
    if title is not None:
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        log_figure(figures.confusion_matrix(rates, class_names, title=title), f"figures/confusion_matrix_{split}.png")
    log_csv(pd.DataFrame(counts, index=class_names, columns=class_names).reset_index(names="true\\predicted"),
            f"tables/confusion_matrix_{split}.csv")
