"""Figures logged by the experiments. Each function returns a matplotlib Figure (the Agg backend, no display)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def class_distribution(counts: pd.DataFrame, split: str) -> Figure:
    """Bar plot of images per class (sorted) for one split, with the mean marked."""
    values = counts[split].sort_values(ascending=False).to_numpy()
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.bar(np.arange(len(values)), values, width=1.0, color="tab:blue")
    ax.axhline(values.mean(), color="tab:red", linestyle="--", label=f"mean {values.mean():.2f}")
    ax.set(xlabel="class (sorted by count)", ylabel="images", title=f"Images per class — {split}")
    ax.legend()
    fig.tight_layout()
    return fig


def histogram(values: np.ndarray, title: str, xlabel: str, bins: int = 40) -> Figure:
    """A plain histogram."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=bins, color="tab:blue", edgecolor="white")
    ax.set(title=title, xlabel=xlabel, ylabel="images")
    fig.tight_layout()
    return fig


def size_scatter(widths: np.ndarray, heights: np.ndarray, title: str) -> Figure:
    """Width vs height scatter with marginal-free axes."""
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(widths, heights, s=4, alpha=0.4)
    ax.set(title=title, xlabel="width (px)", ylabel="height (px)")
    fig.tight_layout()
    return fig


def bar_counts(counts: dict[str, int], title: str) -> Figure:
    """Bar plot of a small categorical count (e.g. colour modes)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(list(counts), list(counts.values()), color="tab:green")
    for i, v in enumerate(counts.values()):
        ax.text(i, v, str(v), ha="center", va="bottom")
    ax.set(title=title, ylabel="images")
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], boxes: Sequence | None = None,
               cols: int = 4, title: str = "") -> Figure:
    """A grid of images with titles and optional (x1, y1, x2, y2) boxes drawn on them."""
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (img, text) in enumerate(zip(images, titles, strict=True)):
        ax = axes.flat[i]
        ax.imshow(img)
        if boxes is not None and boxes[i] is not None:
            x1, y1, x2, y2 = boxes[i]
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", linewidth=1.5))
        ax.set_title(text, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_curves(history: pd.DataFrame, title: str = "", std: pd.DataFrame | None = None) -> Figure:
    """Loss and accuracy per epoch for train/val/test (test is reported, never used for selection).
    With `std`, shaded mean ± std bands (k-fold mean curves)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split, color in (("train", "tab:blue"), ("val", "tab:orange"), ("test", "tab:green")):
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            col = f"{split}_{metric}"
            if col not in history or history[col].isna().all():
                continue
            ax.plot(history["epoch"], history[col], label=split, color=color)
            if std is not None and col in std:
                ax.fill_between(history["epoch"], history[col] - std[col], history[col] + std[col],
                                color=color, alpha=0.2)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str] | None = None, title: str = "") -> Figure:
    """Heatmap of a (row-normalised) confusion matrix; names on the axes when there are few enough to read."""
    n = matrix.shape[0]
    size = min(4 + n * 0.12, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(matrix, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if class_names is not None and n <= 200:
        fontsize = max(2, min(8, 400 // max(n, 1)))
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), class_names, fontsize=fontsize)
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix (row-normalised)")
    fig.tight_layout()
    return fig
