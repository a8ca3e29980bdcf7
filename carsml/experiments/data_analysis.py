"""Study row 1 — data analysis: counts, per-class statistics, distributions, image statistics, sample images."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from carsml.data.images import open_rgb, read_header
from carsml.data.table import SPLITS, Dataset
from carsml.experiments.common import resolve_dataset
from carsml.tracking import figures
from carsml.tracking import tags as tag
from carsml.tracking.runs import (
    log_csv,
    log_dataset,
    log_figure,
    log_metrics,
    log_text,
    set_tags,
    setup_tracking,
    start_run,
)


def class_counts(dataset: Dataset) -> pd.DataFrame:
    """Images per class and split: columns class_id (1-based, as the devkit), class_name, train, test."""
    table = dataset.table
    out = pd.DataFrame({"class_id": np.arange(1, dataset.num_classes + 1), "class_name": dataset.class_names})
    for split in SPLITS:
        counts = np.bincount(table.loc[table["split"] == split, "label"], minlength=dataset.num_classes)
        out[split] = counts
    return out


def split_statistics(counts: pd.DataFrame, splits: list[str]) -> dict[str, float]:
    """Per split: images, and the mean/min/max/std of images per class (the study's table)."""
    stats: dict[str, float] = {"n_classes": float(len(counts))}
    for split in splits:
        col = counts[split]
        stats[f"{split}_images"] = float(col.sum())
        stats[f"{split}_class_count_mean"] = round(float(col.mean()), 4)
        stats[f"{split}_class_count_min"] = float(col.min())
        stats[f"{split}_class_count_max"] = float(col.max())
        stats[f"{split}_class_count_std"] = round(float(col.std(ddof=0)), 4)
    return stats


def image_statistics(rows: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """Size, colour mode and box-area fraction read from image headers (no full decode) for up to `limit` images."""
    if limit and len(rows) > limit:
        rows = rows.sample(n=limit, random_state=seed)

    with ThreadPoolExecutor() as pool:
        headers = list(pool.map(read_header, rows["path"]))
    stats = rows[["fname", "split", "label", "x1", "y1", "x2", "y2"]].copy()
    stats["width"] = [h[0] for h in headers]
    stats["height"] = [h[1] for h in headers]
    stats["mode"] = [h[2] for h in headers]
    stats["aspect_ratio"] = stats["width"] / stats["height"]
    box_w = stats["x2"].clip(upper=stats["width"]) - stats["x1"]
    box_h = stats["y2"].clip(upper=stats["height"]) - stats["y1"]
    stats["box_area_fraction"] = (box_w * box_h) / (stats["width"] * stats["height"])
    return stats


def _log_image_statistics(stats: pd.DataFrame) -> None:
    modes = stats["mode"].value_counts().to_dict()
    log_metrics({f"mode_{m}_images": float(c) for m, c in modes.items()})
    log_metrics({
        "image_width_median": float(stats["width"].median()),
        "image_height_median": float(stats["height"].median()),
        "aspect_ratio_median": float(stats["aspect_ratio"].median()),
        "box_area_fraction_mean": float(stats["box_area_fraction"].mean()),
        "image_stats_sampled": float(len(stats)),
    })
    log_figure(figures.size_scatter(stats["width"].to_numpy(), stats["height"].to_numpy(), "Image sizes"),
               "figures/image_sizes.png")
    log_figure(figures.histogram(stats["aspect_ratio"].to_numpy(), "Aspect ratio (width / height)", "aspect ratio"),
               "figures/aspect_ratio.png")
    log_figure(figures.bar_counts(modes, "Colour modes"), "figures/colour_modes.png")
    log_figure(figures.histogram(stats["box_area_fraction"].to_numpy(), "Box area / image area", "fraction"),
               "figures/box_area_fraction.png")
    log_csv(stats, "tables/image_statistics.csv")


def _log_sample_grid(dataset: Dataset, n: int, seed: int) -> None:
    rows = dataset.table.sample(n=min(n, len(dataset.table)), random_state=seed)
    images, titles, boxes = [], [], []
    for row in rows.itertuples(index=False):
        images.append(np.asarray(open_rgb(row.path)))
        titles.append(f"{row.class_name}\n{row.split}/{row.fname}")
        boxes.append((row.x1, row.y1, row.x2, row.y2))
    log_figure(figures.image_grid(images, titles, boxes, title="Sample images with bounding boxes"),
               "figures/sample_images.png")


def run(cfg: dict[str, Any]) -> dict[str, float]:
    """Analyse the dataset named by `cfg["data"]`, logging everything to one MLflow run; returns the metrics."""
    setup_tracking()  # a bad tracking URI fails before the dataset is read
    dataset = resolve_dataset(cfg)
    with start_run("data_analysis", cfg):
        table = dataset.table
        splits = [s for s in SPLITS if (table["split"] == s).any()]
        for split in splits:
            log_dataset(dataset, table[table["split"] == split], context=split)
        counts = class_counts(dataset)
        stats = split_statistics(counts, splits)
        log_metrics(stats)
        log_csv(counts, "tables/class_counts.csv", as_table=True)
        for split in splits:
            log_figure(figures.class_distribution(counts, split), f"figures/class_distribution_{split}.png")
        box_w = (table["x2"] - table["x1"]).to_numpy()
        box_h = (table["y2"] - table["y1"]).to_numpy()
        log_figure(figures.size_scatter(box_w, box_h, "Bounding-box sizes"), "figures/box_sizes.png")
        if dataset.notes:
            log_text("\n".join(dataset.notes), "notes.txt")
        if dataset.has_images:
            _log_image_statistics(image_statistics(table, cfg["image_stats_limit"], cfg["seed"]))
            if cfg["sample_images"] > 0:
                _log_sample_grid(dataset, cfg["sample_images"], cfg["seed"])
        set_tags({tag.HAS_IMAGES: str(dataset.has_images).lower()})
    return stats
