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


# ---------------------------------------------------------------------------------- model analysis (errors, tta)


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def confusion_heatmap(matrix: np.ndarray, class_names: Sequence[str], title: str, *, hide_diagonal: bool = False,
                      annotate: bool = False) -> Figure:
    """A confusion heatmap in the order given (e.g. clustered), names on both axes.

    `hide_diagonal` blanks the correct predictions so the errors set the colour scale; `annotate` writes each
    non-zero cell's value (for small blocks). A square-root colour scale keeps rare confusions visible.
    """
    from matplotlib.colors import PowerNorm

    values = np.asarray(matrix, dtype=float).copy()
    if hide_diagonal:
        np.fill_diagonal(values, np.nan)
    n = values.shape[0]
    size = min(5 + n * 0.13, 32)
    fig, ax = plt.subplots(figsize=(size, size * 0.92))
    finite = values[np.isfinite(values)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#d9d9d9")
    im = ax.imshow(values, cmap=cmap, norm=PowerNorm(0.5, vmin=0, vmax=vmax), interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    # one tick label per row: as large as a row is tall (about 6 pt for 196 classes), so names stay legible
    fontsize = float(np.clip(size * 0.75 * 72 / max(n, 1) * 0.75, 3, 9))
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), class_names, fontsize=fontsize)
    if annotate:
        for i, j in zip(*np.nonzero(np.nan_to_num(values)), strict=True):
            v = values[i, j]
            ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=max(4, fontsize - 1),
                    color="white" if v > vmax * 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(_wrap(title, int(8 * size)), fontsize=10)
    fig.tight_layout()
    return fig


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str,
              annotations: Sequence[str] | None = None, color: str = "tab:red") -> Figure:
    """Horizontal bars, first label on top (long class names stay readable); optional text after each bar."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * max(n, 1)))
    y = np.arange(n)
    ax.barh(y, values, color=color)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    for i, text in enumerate(annotations or []):
        ax.text(values[i], i, f" {text}", va="center", fontsize=7)
    ax.set(title=title, xlabel=xlabel)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def error_gallery(items: Sequence[tuple[np.ndarray, np.ndarray, str, str, float]], title: str = "",
                  pairs_per_row: int = 2) -> Figure:
    """Misclassified images, each beside an example of the class it was mistaken for.

    Each item is (misclassified image, example image of the predicted class, true name, predicted name,
    confidence of the prediction).
    """
    rows = max(1, int(np.ceil(len(items) / pairs_per_row)))
    cols = 2 * pairs_per_row
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (image, example, true_name, pred_name, confidence) in enumerate(items):
        left, right = axes.flat[2 * k], axes.flat[2 * k + 1]
        left.imshow(image)
        left.set_title(f"true: {_wrap(true_name)}\npredicted ({confidence:.0%}):\n{_wrap(pred_name)}", fontsize=7,
                       color="tab:red")
        right.imshow(example)
        right.set_title(f"a training image of\n{_wrap(pred_name)}", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()) if title else None)
    return fig


def confidence_histogram(correct: np.ndarray, wrong: np.ndarray, title: str = "", bins: int = 20) -> Figure:
    """Histogram of the top-1 confidence of correct and wrong predictions."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    edges = np.linspace(0, 1, bins + 1)
    ax.hist(correct, bins=edges, alpha=0.6, color="tab:green", label=f"correct ({len(correct)})")
    ax.hist(wrong, bins=edges, alpha=0.6, color="tab:red", label=f"wrong ({len(wrong)})")
    ax.set(xlabel="confidence (top-1 probability)", ylabel="images", title=title or "Confidence")
    ax.legend()
    fig.tight_layout()
    return fig


def reliability_diagram(table: pd.DataFrame, ece: float, title: str = "") -> Figure:
    """Accuracy vs confidence per bin (columns lo, hi, count, confidence, accuracy), with the gap shaded."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = table["hi"] - table["lo"]
    centres = (table["lo"] + table["hi"]) / 2
    filled = table["count"] > 0
    acc, conf = table.loc[filled, "accuracy"], table.loc[filled, "confidence"]
    ax.bar(centres[filled], acc, width=width[filled], edgecolor="black", color="tab:blue", label="accuracy")
    # the gap between accuracy and mean confidence, hatched (no fill) so it reads the same above or below the bar
    ax.bar(centres[filled], (conf - acc).abs(), bottom=np.minimum(acc, conf), width=width[filled], fill=False,
           hatch="//", edgecolor="tab:red", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(ylabel="accuracy", title=title or f"Reliability diagram (ECE {ece:.3f})", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    ax_n.bar(centres, table["count"], width=width, color="tab:gray")
    ax_n.set(xlabel="confidence", ylabel="images")
    fig.tight_layout()
    return fig


def tta_summary(accuracies: dict[str, float], view_accuracies: np.ndarray, title: str = "") -> Figure:
    """Accuracy without and with test-time augmentation (bars) and the accuracy of each single view."""
    fig, (ax, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    names, values = list(accuracies), list(accuracies.values())
    ax.bar(names, values, color=["tab:gray", *["tab:blue"] * (len(values) - 1)])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2%}", ha="center", va="bottom")
    ax.set(ylabel="accuracy", title="Accuracy", ylim=(0, min(1.0, max(values) * 1.15 + 0.01)))
    ax_v.plot(np.arange(len(view_accuracies)), view_accuracies, marker="o", markersize=3)
    if "no TTA" in accuracies:
        ax_v.axhline(accuracies["no TTA"], color="tab:gray", linestyle="--", label="no TTA")
        ax_v.legend()
    ax_v.set(xlabel="view", ylabel="accuracy of that view alone", title="Single views")
    ax_v.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
