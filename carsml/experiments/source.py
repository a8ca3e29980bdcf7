"""The trained model an analysis starts from, and exactly the data its training run used.

`load_source` loads a model by MLflow run id or `models:/` URI together with its training run's settings;
`plan_data` resolves that run's dataset (with the user's overrides, classes checked against the model) before any run
starts, and `decode_splits` decodes it into the same train / validation / test splits the training run had — classes
added by `new_category` (`NewClass`) included. Used by errors, tta and new_category.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.entities import Run  # mlflow: the type of the training run a Source holds (read through tracking.search)
from torch import nn

from carsml.data.cache import DecodedImages, build_cache
from carsml.data.images import read_header
from carsml.data.readers_files import IMAGE_EXTENSIONS
from carsml.data.splits import kfold_splits, train_val_split
from carsml.data.synthetic import ensure_synthetic
from carsml.data.table import Dataset, make_table
from carsml.data.transforms import build_transform
from carsml.engine.loader import ArrayData
from carsml.errors import CarsmlError, ConfigError, DataError
from carsml.experiments.common import cache_root, check_inference, limit_classes, resolve_dataset
from carsml.experiments.train import decode
from carsml.tracking import tags as tag
from carsml.tracking.models import load_model, resolve_model_uri
from carsml.tracking.runs import log_dataset
from carsml.tracking.search import best_trained_run, config_from_run, model_training_run

SYNTHETIC_EXTRA = "BIG_TRUCKS"  # the folder the synthetic generator writes next to the dataset


# What decides the data a model was trained and evaluated on (read from its training run).
SOURCE_DATA_KEYS = ("data", "synth_classes", "synth_images_per_class", "synth_seed", "cache_dir", "image_size",
                    "use_boxes", "crop_margin", "skip_unreadable", "max_classes", "val_fraction", "seed")
# Data options of the analysis entry points (SourceOptions): None = the same as the source run.
SAME_AS_SOURCE = ("data", "synth_classes", "synth_images_per_class", "synth_seed", "cache_dir", "image_size",
                  "use_boxes", "crop_margin", "skip_unreadable")


@dataclass
class Source:
    """A trained carsml model and the run that trained it."""

    ref: str  # what the user passed (run id or models:/ URI)
    model_uri: str  # models:/m-...
    run: Run  # the training run
    cfg: dict[str, Any]  # the training settings (the run's resolved config, or the bundle's train_cfg)
    data_cfg: dict[str, Any]  # how to rebuild its data: SOURCE_DATA_KEYS (+ fold / folds for a k-fold child)
    model: nn.Module
    info: dict[str, Any]  # the bundle's model.json

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def added_classes(self) -> list[dict[str, Any]]:
        """Classes added by new_category (name, folder, split settings), in label order after the dataset's."""
        return list(self.info.get("added_classes", []))

    def tags(self) -> dict[str, str]:
        """Tags linking an analysis run to the model it analysed."""
        return {tag.SOURCE_RUN_ID: self.run_id, tag.SOURCE_MODEL_URI: self.model_uri,
                tag.SOURCE_ENTRY_POINT: self.run.data.tags.get(tag.ENTRY_POINT, ""),
                tag.MODEL: str(self.info["model_config"].get("name", ""))}


def load_source(ref: str, experiment_name: str) -> Source:
    """Load the model named by `ref` (an MLflow run id, runs:/ or models:/ URI) and its training run's settings; with
    `ref` empty, the best finished training run of `experiment_name` by validation accuracy (`best_trained_run`).

    Raises a CarsmlError naming `ref` for an unknown run or model, a run without a model, or a run whose data
    cannot be rebuilt. Never accepts a file path: models are identified through MLflow.
    """
    ref = (ref or "").strip() or best_trained_run(experiment_name).info.run_id
    if not ref.startswith(("models:/", "runs:/")) and ("/" in ref or "\\" in ref or Path(ref).exists()):
        raise ConfigError(f"run_id={ref!r} looks like a file path; pass the MLflow run id or models:/ URI of the "
                          f"model (models are loaded through MLflow, never from a loose file)")
    uri = resolve_model_uri(ref)
    model, info = load_model(uri)
    run = model_training_run(ref, uri, info)
    cfg = dict(info["train_cfg"]) if "train_cfg" in info else config_from_run(run)
    data_cfg = dict(info["data_cfg"]) if "data_cfg" in info else _data_config(run, cfg)
    return Source(ref, uri, run, cfg, data_cfg, model, info)


def _data_config(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in SOURCE_DATA_KEYS if k not in cfg]
    if missing:
        raise CarsmlError(f"Run {run.info.run_id} ({cfg['entry_point']}) does not record {', '.join(missing)}; "
                          f"cannot rebuild the data it was trained on")
    data_cfg = {k: cfg[k] for k in SOURCE_DATA_KEYS}
    fold = run.data.tags.get(tag.FOLD)
    if fold is not None and "folds" in cfg:  # a k-fold child: its validation set is its held-out fold
        data_cfg.update(fold=int(fold), folds=int(cfg["folds"]))
    return data_cfg


@dataclass
class DataPlan:
    """The data of a source model, resolved (tables only, nothing decoded) before any run starts."""

    cfg: dict[str, Any]  # effective data options: the source's, with the user's overrides
    dataset: Dataset  # the dataset's own classes
    class_names: list[str]  # every class the model predicts: the dataset's, then added ones
    added: list[NewClass] = field(default_factory=list)  # one per class added by new_category


def effective_data_config(source: Source, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The source's data options, replaced by every option the user set (not None: 'the same as the source run')."""
    data_cfg = dict(source.data_cfg)
    data_cfg.update({key: cfg[key] for key in SAME_AS_SOURCE if cfg.get(key) is not None})
    return data_cfg


def check_input_size(model: nn.Module, info: dict[str, Any], image_size: int) -> None:
    """A model built for one input size may not take another (our CNNs' flatten head): fail before any run."""
    if image_size == int(info["image_size"]):
        return
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, 3, image_size, image_size))
    except Exception as exc:  # noqa: BLE001 - any failure means this size does not fit the model
        raise ConfigError(f"image_size={image_size}: the model was trained at {info['image_size']} px and rejects "
                          f"{image_size} px inputs ({type(exc).__name__}: {exc}); leave image_size empty") from None


def plan_data(source: Source, cfg: dict[str, Any]) -> DataPlan:
    """Resolve the source model's dataset (with the user's overrides) and check its classes are the model's."""
    data_cfg = effective_data_config(source, cfg)
    check_input_size(source.model, source.info, int(data_cfg["image_size"]))
    dataset = limit_classes(resolve_dataset(data_cfg), data_cfg["max_classes"])
    names, added = list(dataset.class_names), []
    for spec in source.added_classes:  # classes added by new_category, in label order
        added.append(plan_new_class(spec, data_cfg, names))
        names.append(added[-1].class_name)
    if names != source.class_names:
        raise DataError(_class_mismatch(names, source, data_cfg))
    return DataPlan(data_cfg, dataset, names, added)


def _class_mismatch(names: list[str], source: Source, data_cfg: dict[str, Any]) -> str:
    model_names = source.class_names
    where = next((i for i, (a, b) in enumerate(zip(names, model_names, strict=False)) if a != b),
                 min(len(names), len(model_names)))
    shown = (f"class {where}: data {names[where] if where < len(names) else '(none)'!r}, "
             f"model {model_names[where] if where < len(model_names) else '(none)'!r}")
    return (f"The classes of data={data_cfg['data']!r} (max_classes={data_cfg['max_classes']}) do not match the "
            f"model {source.model_uri} ({len(names)} vs {len(model_names)} classes; first difference at {shown}). "
            f"Analyse a model on the data it was trained on (leave data empty = the source run's).")


@dataclass
class SourceSplits:
    """Decoded train / validation / test images of a plan, with one table row per image in the same order."""

    train: ArrayData
    val: ArrayData
    test: ArrayData | None
    tables: dict[str, pd.DataFrame]  # split -> rows (fname, path, label, class_name, ...) aligned with the data


def decode_splits(plan: DataPlan) -> SourceSplits:
    """Decode (through the cache) and split the plan's data exactly as the source run did; inside the active run."""
    cfg = plan.cfg
    train_rows = decode(cfg, plan.dataset, "train")
    test_rows = decode(cfg, plan.dataset, "test")
    if "fold" in cfg:
        train_idx, val_idx = kfold_splits(train_rows.labels, int(cfg["folds"]), int(cfg["seed"]))[int(cfg["fold"])]
    else:
        train_idx, val_idx = train_val_split(train_rows.labels, float(cfg["val_fraction"]), int(cfg["seed"]))
    if plan.added:
        return combine(plan, train_rows, test_rows, train_idx, val_idx)
    all_train = ArrayData(train_rows.images, train_rows.labels)
    tables = {"train": train_rows.table.iloc[train_idx].reset_index(drop=True),
              "val": train_rows.table.iloc[val_idx].reset_index(drop=True)}
    test = None
    if test_rows is not None:
        test = ArrayData(test_rows.images, test_rows.labels)
        tables["test"] = test_rows.table
    return SourceSplits(all_train.subset(train_idx), all_train.subset(val_idx), test, tables)


def eval_transform(info: dict[str, Any]) -> Any:
    """The model's own evaluation transform (resize already done by the cache; scale and normalise)."""
    return build_transform("none", mean=info["mean"], std=info["std"])


def require_split(plan: DataPlan, split: str) -> None:
    """Fail before the run when the dataset lacks the split to analyse (e.g. a layout without a test split)."""
    if split == "test" and plan.dataset.split("test").empty:
        raise DataError(f"data={plan.cfg['data']!r} has no official test split to analyse; use split=val")



def prepare_analysis(cfg: dict[str, Any], split: str) -> tuple[Source, DataPlan]:
    """What an analysis entry point (errors, tta) checks before its run starts: the inference options, the model
    `run_id` names, its data (classes checked against the model) and the split to analyse."""
    check_inference(cfg)
    source = load_source(cfg["run_id"], cfg["experiment_name"])
    plan = plan_data(source, cfg)
    require_split(plan, split)
    return source, plan


def decode_analysed(plan: DataPlan, split: str) -> tuple[SourceSplits, ArrayData]:
    """Inside the analysis run: decode the plan's splits, record the analysed split's rows, return it."""
    splits = decode_splits(plan)
    log_dataset(plan.dataset, splits.tables[split], split)
    return splits, splits.test if split == "test" else splits.val


# ==================================================================== classes added by new_category


@dataclass
class NewClass:
    """An added class: its images (whole-image boxes), their train / val / test roles, and how they were chosen."""

    class_name: str
    folder: Path
    label: int
    table: pd.DataFrame  # dataset-table columns + role (train | val | test), one row per image
    spec: dict[str, Any]  # what the bundle records to rebuild it: class_name, folder, test_fraction, seed

    def count(self, role: str) -> int:
        return int((self.table["role"] == role).sum())


def default_folder(data_cfg: dict[str, Any]) -> Path:
    """The synthetic BIG_TRUCKS folder next to the synthetic dataset (data=synthetic only)."""
    if data_cfg["data"] != "synthetic":
        raise ConfigError("folder: required when data is not 'synthetic' — the folder of images of the new class "
                          "(e.g. -P folder=/data/big_trucks)")
    root = ensure_synthetic(cache_root(data_cfg) / "synthetic", num_classes=data_cfg["synth_classes"],
                            images_per_class=data_cfg["synth_images_per_class"], seed=data_cfg["synth_seed"])
    return root.parent / SYNTHETIC_EXTRA


def list_images(folder: Path) -> list[Path]:
    """The image files of a new class's folder; DataError for a missing or empty folder or one without images."""
    if not folder.is_dir():
        raise DataError(f"folder={str(folder)!r}: no such folder; expected a folder of images of the new class")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"folder={str(folder)!r} is empty; expected images of the new class "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        shown = ", ".join(p.name for p in files[:5]) + (", ..." if len(files) > 5 else "")
        raise DataError(f"folder={str(folder)!r} holds no images: {len(files)} file(s) ({shown}); expected "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
    return images


def _sizes(images: list[Path], skip_unreadable: bool) -> tuple[list[Path], list[tuple[int, int]]]:
    """Header sizes of the images (cheap); unreadable files fail here, before any run, unless skipped."""
    kept, sizes, failures = [], [], []
    for path in images:
        try:
            header = read_header(path)
        except DataError as exc:
            failures.append(str(exc))
            continue
        kept.append(path)
        sizes.append((header.width, header.height))
    if failures and not skip_unreadable:
        shown = "\n  ".join(failures[:5])
        raise DataError(f"{len(failures)} file(s) of the new class are not readable images (pass "
                        f"skip_unreadable=true to leave them out):\n  {shown}")
    return kept, sizes


def split_counts(n: int, test_fraction: float, val_fraction: float, folder: Path) -> tuple[int, int, int]:
    """(train, val, test) image counts for n images: the fractions rounded, but at least one of each."""
    if n < 3:
        raise DataError(f"folder={str(folder)!r} has {n} usable image(s); the new class needs at least 3: one "
                        f"for training, one for validation and one for test (dozens for metrics that mean much)")
    n_test = min(max(1, round(n * test_fraction)), n - 2)
    n_val = min(max(1, round((n - n_test) * val_fraction)), n - n_test - 1)
    return n - n_test - n_val, n_val, n_test


def plan_new_class(spec: dict[str, Any], data_cfg: dict[str, Any], existing: list[str]) -> NewClass:
    """Check and split a new class's folder (headers only, nothing decoded): raises before any run on bad input."""
    name = str(spec["class_name"]).strip()
    if not name:
        raise ConfigError("class_name: expected the name of the new class (e.g. BIG_TRUCKS); got an empty string")
    if name in existing:
        raise ConfigError(f"class_name={name!r} already exists (class id {existing.index(name)} of the source "
                          f"model's {len(existing)} classes); choose a new name")
    test_fraction = float(spec["test_fraction"])
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction: expected a fraction in (0, 1); got {spec['test_fraction']!r}")
    folder = Path(spec["folder"]).expanduser().resolve() if spec["folder"] else default_folder(data_cfg)
    images, sizes = _sizes(list_images(folder), bool(data_cfg["skip_unreadable"]))
    n_train, n_val, n_test = split_counts(len(images), test_fraction, float(data_cfg["val_fraction"]), folder)
    order = np.random.default_rng(int(spec["seed"])).permutation(len(images))
    roles = np.empty(len(images), dtype=object)
    roles[order[:n_test]] = "test"
    roles[order[n_test:n_test + n_val]] = "val"
    roles[order[n_test + n_val:]] = "train"
    label = len(existing)
    boxes = folder_boxes(folder, images, sizes)
    table = make_table([{"path": str(p), "label": label, "class_name": name, "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                         "split": "test" if r == "test" else "train", "fname": p.name}
                        for p, (x1, y1, x2, y2), r in zip(images, boxes, roles, strict=True)])
    table["role"] = roles
    return NewClass(name, folder, label, table, {"class_name": name, "folder": spec["folder"] and str(spec["folder"]),
                                                 "test_fraction": test_fraction, "seed": int(spec["seed"])})


BOX_FILE = "boxes.csv"  # optional, in a new class's folder: fname,x1,y1,x2,y2 (1-based inclusive, as Stanford Cars)


def folder_boxes(folder: Path, images: list[Path], sizes: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """0-based exclusive boxes of a new class's images: from the folder's `boxes.csv` when it has one (the other
    classes are cropped to their boxes, so the new class is too), else the whole image (`new_class_boxes` says which).
    A file that lacks an image, or a box outside its image, is a DataError naming the file and the row."""
    path = folder / BOX_FILE
    if not path.is_file():
        return [(0, 0, w, h) for w, h in sizes]
    try:
        rows = pd.read_csv(path, dtype={"fname": str}).set_index("fname")
        rows = rows[["x1", "y1", "x2", "y2"]].astype("int64")
    except (ValueError, KeyError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: expected columns fname,x1,y1,x2,y2 with integer pixel coordinates ({exc})") from None
    missing = [p.name for p in images if p.name not in rows.index]
    if missing:
        raise DataError(f"{path}: no box for {len(missing)} image(s) of the folder, e.g. {', '.join(missing[:3])}")
    boxes = []
    for image, (w, h) in zip(images, sizes, strict=True):
        x1, y1, x2, y2 = (int(v) for v in rows.loc[image.name])
        if not (1 <= x1 <= x2 <= w and 1 <= y1 <= y2 <= h):
            raise DataError(f"{path}, {image.name}: box ({x1}, {y1}, {x2}, {y2}) is not inside the {w}x{h} image; "
                            f"expected 1-based inclusive coordinates with 1 <= x1 <= x2 <= width, 1 <= y1 <= y2 <= "
                            f"height")
        boxes.append((x1 - 1, y1 - 1, x2, y2))
    return boxes


def _decode_new(new: NewClass, data_cfg: dict[str, Any]) -> DecodedImages:
    # the same preprocessing as the other classes (crop to the box with the same margin, resize): what serving sees too
    return build_cache(new.table, int(data_cfg["image_size"]), cache_dir=cache_root(data_cfg),
                       use_boxes=bool(data_cfg["use_boxes"]), margin=float(data_cfg["crop_margin"]),
                       skip_unreadable=bool(data_cfg["skip_unreadable"]))


def combine(plan: DataPlan, train_rows: DecodedImages, test_rows: DecodedImages | None, train_idx: np.ndarray,
            val_idx: np.ndarray) -> SourceSplits:
    """The dataset's splits plus every added class's images, as one in-memory array viewed per split."""
    parts: list[np.ndarray] = [np.asarray(train_rows.images)]
    labels: list[np.ndarray] = [train_rows.labels]
    tables: list[pd.DataFrame] = [train_rows.table.assign(role="")]
    roles = {"train": [np.asarray(train_idx)], "val": [np.asarray(val_idx)], "test": []}
    offset = len(train_rows.labels)
    if test_rows is not None:
        parts.append(np.asarray(test_rows.images))
        labels.append(test_rows.labels)
        tables.append(test_rows.table.assign(role="test"))
        roles["test"].append(offset + np.arange(len(test_rows.labels)))
        offset += len(test_rows.labels)
    for new in plan.added:
        decoded = _decode_new(new, plan.cfg)
        parts.append(np.asarray(decoded.images))
        labels.append(decoded.labels)
        tables.append(decoded.table)
        for role in roles:
            roles[role].append(offset + np.flatnonzero(decoded.table["role"].to_numpy() == role))
        offset += len(decoded.labels)
    data = ArrayData(np.concatenate(parts), np.concatenate(labels))
    table = pd.concat(tables, ignore_index=True)
    index = {role: np.concatenate(chunks) if chunks else np.zeros(0, np.int64) for role, chunks in roles.items()}
    views = {role: data.subset(idx) for role, idx in index.items()}
    split_tables = {role: table.iloc[idx].reset_index(drop=True) for role, idx in index.items()}
    return SourceSplits(views["train"], views["val"], views["test"] if len(index["test"]) else None, split_tables)
