"""Study rows 4 and 7 — misclassification analysis of a trained model on the test (or validation) split.

Logs the full confusion matrix in a clustered order (confusable classes side by side) and a zoom on its most-confused
block, the most-confused class pairs by name, per-class accuracy / precision / recall, a gallery of misclassified images
each beside a training image of the class it was taken for, calibration (confidence histogram, reliability diagram,
`ece`) and how many errors stay inside one make / model (`errors_same_make_model_share`, `errors_year_only_share`, ...):
the fine-grained part of Stanford Cars.

This module also holds what the analysis entry points (errors, tta, new_category) share: `load_source` loads the
model to analyse by MLflow run id or `models:/` URI, and `plan_data` / `decode_splits` rebuild exactly the data its
training run used (same classes, same validation split, same test split).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from carsml.config import load_config, options
from carsml.data.splits import kfold_splits, train_val_split
from carsml.data.table import Dataset
from carsml.data.transforms import build_transform
from carsml.engine.device import AMP_CHOICES, resolve_device
from carsml.engine.evaluate import EvalResult, evaluate
from carsml.engine.loader import ArrayData
from carsml.errors import CarsmlError, ConfigError, DataError
from carsml.experiments.common import limit_classes, resolve_dataset
from carsml.tracking import figures
from carsml.tracking.models import load_model, resolve_model_uri
from carsml.tracking.runs import log_csv, log_dataset, log_figure, setup_tracking, start_run

# ============================================================================ shared: the model to analyse and its data

# What decides the data a model was trained and evaluated on (read from its training run).
SOURCE_DATA_KEYS = ("data", "synth_classes", "synth_images_per_class", "synth_seed", "cache_dir", "image_size",
                    "use_boxes", "crop_margin", "skip_unreadable", "max_classes", "val_fraction", "seed")
# Data options of the analysis entry points and the value that means "the same as the source run".
SAME_AS_SOURCE: dict[str, Any] = {"data": "", "synth_classes": 0, "synth_images_per_class": 0, "synth_seed": -1,
                                  "cache_dir": "", "image_size": 0, "use_boxes": "", "crop_margin": -1.0,
                                  "skip_unreadable": ""}
_BOOL_TEXT = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


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
        return {"carsml.source_run_id": self.run_id, "carsml.source_model_uri": self.model_uri,
                "carsml.source_entry_point": self.run.data.tags.get("carsml.entry_point", ""),
                "carsml.model": str(self.info["model_config"].get("name", ""))}


def load_source(ref: str) -> Source:
    """Load the model named by `ref` (an MLflow run id, runs:/ or models:/ URI) and its training run's settings.

    Raises a CarsmlError naming `ref` for an unknown run or model, a run without a model, or a run whose data
    cannot be rebuilt. Never accepts a file path: models are identified through MLflow.
    """
    ref = (ref or "").strip()
    if not ref:
        raise ConfigError("run_id: required — the MLflow run id or models:/ URI of a trained model "
                          "(e.g. -P run_id=<id of an improved run>, or run_id=models:/m-...)")
    if not ref.startswith(("models:/", "runs:/")) and ("/" in ref or "\\" in ref or Path(ref).exists()):
        raise ConfigError(f"run_id={ref!r} looks like a file path; pass the MLflow run id or models:/ URI of the "
                          f"model (models are loaded through MLflow, never from a loose file)")
    uri = resolve_model_uri(ref)
    model, info = load_model(uri)
    run = _training_run(ref, uri, info)
    cfg = dict(info["train_cfg"]) if "train_cfg" in info else _run_config(run)
    data_cfg = dict(info["data_cfg"]) if "data_cfg" in info else _data_config(run, cfg)
    return Source(ref, uri, run, cfg, data_cfg, model, info)


def _training_run(ref: str, uri: str, info: dict[str, Any]) -> Run:
    if ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].split("/", 1)[0]
    elif ref.startswith("models:/"):
        run_id = info.get("source_run_id") or _logged_model_run(uri)
    else:
        run_id = ref
    if not run_id:
        raise CarsmlError(f"Model {uri!r} does not record the run that trained it; pass that run's id as run_id")
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise CarsmlError(f"The run {run_id!r} that trained {uri!r} is not in this tracking store "
                          f"({mlflow.get_tracking_uri()}): {exc}") from None


def _logged_model_run(uri: str) -> str:
    model_id = uri[len("models:/"):].split("/", 1)[0]
    try:
        return mlflow.get_logged_model(model_id).source_run_id or ""
    except MlflowException:
        return ""


def _run_config(run: Run) -> dict[str, Any]:
    """The training run's config, typed again (run params are strings) with its entry point's defaults filled in."""
    entry = run.data.tags.get("carsml.entry_point", "")
    if not entry:
        raise CarsmlError(f"Run {run.info.run_id} was not made by carsml (no carsml.entry_point tag); its data "
                          f"cannot be rebuilt")
    known = options(entry)
    return load_config(entry, {k: v for k, v in run.data.params.items() if k in known})


def _data_config(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in SOURCE_DATA_KEYS if k not in cfg]
    if missing:
        raise CarsmlError(f"Run {run.info.run_id} ({cfg['entry_point']}) does not record {', '.join(missing)}; "
                          f"cannot rebuild the data it was trained on")
    data_cfg = {k: cfg[k] for k in SOURCE_DATA_KEYS}
    fold = run.data.tags.get("carsml.fold")
    if fold is not None and "folds" in cfg:  # a k-fold child: its validation set is its held-out fold
        data_cfg.update(fold=int(fold), folds=int(cfg["folds"]))
    return data_cfg


@dataclass
class DataPlan:
    """The data of a source model, resolved (tables only, nothing decoded) before any run starts."""

    cfg: dict[str, Any]  # effective data options: the source's, with the user's overrides
    dataset: Dataset  # the dataset's own classes
    class_names: list[str]  # every class the model predicts: the dataset's, then added ones
    added: list[Any] = field(default_factory=list)  # new_category.NewClass per added class


def _override(key: str, value: Any) -> Any:
    if key in ("use_boxes", "skip_unreadable"):
        parsed = _BOOL_TEXT.get(str(value).strip().lower())
        if parsed is None:
            raise ConfigError(f"Option {key!r}: expected true, false or empty (= the source run's); got {value!r}")
        return parsed
    return value


def effective_data_config(source: Source, cfg: dict[str, Any]) -> dict[str, Any]:
    """The source's data options, replaced by every option the user set (not left at its 'same as source' value)."""
    data_cfg = dict(source.data_cfg)
    for key, unset in SAME_AS_SOURCE.items():
        if key in cfg and cfg[key] != unset:
            data_cfg[key] = _override(key, cfg[key])
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
                          f"{image_size} px inputs ({type(exc).__name__}: {exc}); leave image_size at 0") from None


def plan_data(source: Source, cfg: dict[str, Any]) -> DataPlan:
    """Resolve the source model's dataset (with the user's overrides) and check its classes are the model's."""
    from carsml.experiments.new_category import plan_new_class

    data_cfg = effective_data_config(source, cfg)
    check_input_size(source.model, source.info, int(data_cfg["image_size"]))
    dataset = limit_classes(resolve_dataset(data_cfg), int(data_cfg["max_classes"]))
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
class Splits:
    """Decoded train / validation / test images of a plan, with one table row per image in the same order."""

    train: ArrayData
    val: ArrayData
    test: ArrayData | None
    tables: dict[str, pd.DataFrame]  # split -> rows (fname, path, label, class_name, ...) aligned with the data


def decode_splits(plan: DataPlan) -> Splits:
    """Decode (through the cache) and split the plan's data exactly as the source run did; inside the active run."""
    from carsml.experiments.new_category import combine
    from carsml.experiments.train import decode

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
    return Splits(all_train.subset(train_idx), all_train.subset(val_idx), test, tables)


def eval_transform(info: dict[str, Any]) -> Any:
    """The model's own evaluation transform (resize already done by the cache; scale and normalise)."""
    return build_transform("none", mean=info["mean"], std=info["std"])


def require_split(plan: DataPlan, split: str) -> None:
    """Fail before the run when the dataset lacks the split to analyse (e.g. a layout without a test split)."""
    if split == "test" and plan.dataset.split("test").empty:
        raise DataError(f"data={plan.cfg['data']!r} has no official test split to analyse; use split=val")


def check_choice(cfg: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    """cfg[key] if it is one of `choices`, else a ConfigError listing them."""
    value = str(cfg[key]).strip()
    if value not in choices:
        raise ConfigError(f"Option {key!r}: expected one of {', '.join(choices)}; got {cfg[key]!r}")
    return value


def check_inference(cfg: dict[str, Any]) -> None:
    """device, amp and batch_size of an inference entry point, checked before any run exists."""
    resolve_device(str(cfg["device"]))
    check_choice(cfg, "amp", AMP_CHOICES)
    check_positive(cfg, "batch_size")


def check_positive(cfg: dict[str, Any], *keys: str) -> None:
    """Each cfg[key] must be an integer >= 1."""
    for key in keys:
        if int(cfg[key]) < 1:
            raise ConfigError(f"Option {key!r}: expected a positive integer; got {cfg[key]!r}")


# ====================================================================================== class-name structure

# Body styles as Stanford Cars names spell them (longest first, so "Cargo Van" wins over "Van").
BODIES = ("Crew Cab", "Extended Cab", "Regular Cab", "Club Cab", "Quad Cab", "Cargo Van", "Passenger Van", "Wagon Van",
          "SuperCab", "Convertible", "Hatchback", "Minivan", "Sedan", "Coupe", "Wagon", "SUV", "Van", "Cab")
MULTI_WORD_MAKES = ("AM General", "Aston Martin", "Land Rover")
_YEAR = re.compile(r"^(19|20)\d\d$")


class CarName(NamedTuple):
    """`<Make> <Model> <Body> <Year>` parsed from a class name; parts a name lacks are ''."""

    make: str
    model: str
    body: str
    year: str

    @property
    def without_year(self) -> str:
        return " ".join(p for p in (self.make, self.model, self.body) if p)


def parse_class_name(name: str) -> CarName:
    """Split a Stanford Cars class name, e.g. "Chevrolet Express Cargo Van 2007" -> (Chevrolet, Express, Cargo Van,
    2007). Makes of several words and models of several words ("Aston Martin V8 Vantage Coupe 2012") are handled;
    names without a body style ("Chevrolet Corvette ZR1 2012") keep everything in the model."""
    words = name.split()
    year = words.pop() if words and _YEAR.match(words[-1]) else ""
    make_words = next((len(m.split()) for m in MULTI_WORD_MAKES if words[:len(m.split())] == m.split()), 1)
    make, rest = " ".join(words[:make_words]), words[make_words:]
    body = ""
    for candidate in BODIES:
        n = len(candidate.split())
        if len(rest) > n and rest[-n:] == candidate.split():  # keep at least one word of model
            body, rest = candidate, rest[:-n]
            break
    return CarName(make, " ".join(rest), body, year)


RELATIONS = ("year_only", "body_only", "same_make_model", "same_model_line", "same_make", "other")


def relation(true_name: str, pred_name: str) -> str:
    """How two class names relate: year_only (all but the year equal), body_only (same make, model and year),
    same_make_model (body and year both differ), same_model_line (same make and first model word, another variant:
    "Silverado 1500" / "Silverado 1500 Classic", "Charger" / "Charger SRT-8"), same_make, or other."""
    a, b = parse_class_name(true_name), parse_class_name(pred_name)
    if a.make != b.make:
        return "other"
    if a.model != b.model:
        return "same_model_line" if a.model.split()[:1] == b.model.split()[:1] else "same_make"
    if a.without_year == b.without_year:
        return "year_only"
    if a.year == b.year:
        return "body_only"
    return "same_make_model"


def relation_matrix(class_names: list[str]) -> np.ndarray:
    """(C, C) array of RELATIONS indices for every ordered class pair (diagonal: 'other', unused)."""
    index = {r: i for i, r in enumerate(RELATIONS)}
    n = len(class_names)
    out = np.full((n, n), index["other"], dtype=np.int64)
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = index[relation(class_names[i], class_names[j])]
    return out


def fine_grained_shares(counts: np.ndarray, class_names: list[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """Share of the errors that stay inside a make / model (and, for comparison, the share of all class pairs)."""
    rel = relation_matrix(class_names)
    off = counts.astype(float).copy()
    np.fill_diagonal(off, 0)
    n_errors = off.sum()
    n = len(class_names)
    pairs = max(n * (n - 1), 1)
    rows, metrics = [], {}
    for i, name in enumerate(RELATIONS):
        mask = rel == i
        np.fill_diagonal(mask, False)
        errors = float(off[mask].sum())
        rows.append({"relation": name, "errors": int(errors), "share_of_errors": errors / n_errors if n_errors else 0,
                     "share_of_class_pairs": mask.sum() / pairs})
    table = pd.DataFrame(rows)
    share = dict(zip(table["relation"], table["share_of_errors"], strict=True))
    pair_share = dict(zip(table["relation"], table["share_of_class_pairs"], strict=True))
    within_model = ("year_only", "body_only", "same_make_model")
    metrics["errors_year_only_share"] = share["year_only"]
    metrics["errors_body_only_share"] = share["body_only"]
    metrics["errors_same_make_model_share"] = sum(share[r] for r in within_model)
    metrics["errors_same_model_line_share"] = metrics["errors_same_make_model_share"] + share["same_model_line"]
    metrics["errors_same_make_share"] = metrics["errors_same_model_line_share"] + share["same_make"]
    # the same shares for a classifier that erred uniformly at random: how much the errors concentrate
    metrics["chance_same_make_model_share"] = sum(pair_share[r] for r in within_model)
    metrics["chance_same_make_share"] = 1.0 - pair_share["other"]
    return metrics, table


# ============================================================================================ the analysis


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[float, pd.DataFrame]:
    """Expected calibration error (top-label, equal-width bins) and the per-bin table behind the reliability
    diagram: ECE = sum over bins of (images in bin / N) * |accuracy - mean confidence|."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi] bins, 0 in the first
    rows, ece = [], 0.0
    for b in range(bins):
        in_bin = which == b
        count = int(in_bin.sum())
        acc = float(correct[in_bin].mean()) if count else 0.0
        mean_conf = float(conf[in_bin].mean()) if count else 0.0
        ece += count / max(len(labels), 1) * abs(acc - mean_conf)
        rows.append({"lo": edges[b], "hi": edges[b + 1], "count": count, "confidence": mean_conf, "accuracy": acc})
    return float(ece), pd.DataFrame(rows)


def confusion_counts(labels: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts, rows = true class, columns = predicted class."""
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (labels, preds), 1)
    return counts


def cluster_order(counts: np.ndarray) -> np.ndarray:
    """Class order that puts classes confused with each other next to each other: the leaf order of an
    average-linkage clustering on 1 - symmetrised row-normalised confusion (optimal leaf ordering)."""
    n = counts.shape[0]
    if n < 3:
        return np.arange(n)
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    np.fill_diagonal(rates, 0.0)
    similarity = (rates + rates.T) / 2
    distance = 1.0 - similarity / max(similarity.max(), 1e-12)
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance, checks=False)
    tree = linkage(condensed, method="average")
    return leaves_list(optimal_leaf_ordering(tree, condensed))


def most_confused_block(counts: np.ndarray, order: np.ndarray, size: int) -> np.ndarray:
    """The `size` consecutive classes (in `order`) holding the most confusions among themselves."""
    n = len(order)
    size = min(size, n)
    ordered = counts[np.ix_(order, order)].astype(float)
    np.fill_diagonal(ordered, 0)
    ordered = ordered + ordered.T
    best, best_start = -1.0, 0
    for start in range(n - size + 1):
        mass = ordered[start:start + size, start:start + size].sum()
        if mass > best:
            best, best_start = mass, start
    return order[best_start:best_start + size]


def confused_pairs(counts: np.ndarray, class_names: list[str], top: int) -> pd.DataFrame:
    """The `top` most frequent (true -> predicted) errors with names, counts and how the two classes relate."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top]
    rows = []
    for true, pred in zip(*np.unravel_index(flat, off.shape), strict=True):
        if off[true, pred] == 0:
            break
        support = int(counts[true].sum())
        rows.append({"true_id": int(true), "true_class": class_names[true], "predicted_id": int(pred),
                     "predicted_class": class_names[pred], "count": int(off[true, pred]),
                     "share_of_true_class": off[true, pred] / max(support, 1),
                     "relation": relation(class_names[true], class_names[pred]),
                     "pair": f"{class_names[true]} → {class_names[pred]}"})
    return pd.DataFrame(rows, columns=["true_id", "true_class", "predicted_id", "predicted_class", "count",
                                       "share_of_true_class", "relation", "pair"])


def per_class_table(counts: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Per class: support, correct, accuracy (= recall), precision, F1 and the class it is most often taken for."""
    support = counts.sum(axis=1)
    predicted = counts.sum(axis=0)
    correct = np.diag(counts)
    recall = np.divide(correct, support, out=np.zeros(len(support)), where=support > 0)
    precision = np.divide(correct, predicted, out=np.zeros(len(support)), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(support)),
                   where=(precision + recall) > 0)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    top = off.argmax(axis=1)
    return pd.DataFrame({
        "class_id": np.arange(len(class_names)), "class_name": class_names, "support": support,
        "correct": correct, "accuracy": recall, "precision": precision, "recall": recall, "f1": f1,
        "most_confused_with": [class_names[t] if off[i, t] else "" for i, t in enumerate(top)],
        "most_confused_count": off[np.arange(len(top)), top],
    })


@dataclass
class ErrorReport:
    """What the errors entry point computed (also returned to Python callers)."""

    run_id: str
    split: str
    result: EvalResult
    metrics: dict[str, float]
    pairs: pd.DataFrame
    per_class: pd.DataFrame
    errors: pd.DataFrame
    order: np.ndarray


def run(cfg: dict[str, Any]) -> ErrorReport:
    """Analyse the mistakes of the model `cfg["run_id"]` on its test (or validation) split."""
    setup_tracking()
    split = check_choice(cfg, "split", ("test", "val"))
    check_positive(cfg, "top_pairs", "gallery", "worst_classes", "zoom_classes", "calibration_bins")
    check_inference(cfg)
    source = load_source(cfg["run_id"])
    plan = plan_data(source, cfg)
    require_split(plan, split)
    names = plan.class_names
    with start_run(cfg["entry_point"], cfg, run_name=f"errors-{source.run.info.run_name}",
                   tags=source.tags()) as active:
        splits = decode_splits(plan)
        data = splits.test if split == "test" else splits.val
        log_dataset(plan.dataset, splits.tables[split], split)
        result = evaluate(source.model, data, eval_transform(source.info), batch_size=int(cfg["batch_size"]),
                          device=cfg["device"], amp=cfg["amp"])
        counts = confusion_counts(result.labels, result.preds, len(names))
        metrics = {f"{split}_acc": result.acc, f"{split}_loss": result.loss, f"{split}_top5": result.top5,
                   f"{split}_macro_f1": result.macro_f1, f"{split}_images": float(len(result.labels)),
                   f"{split}_errors": float((result.preds != result.labels).sum())}
        order = _log_confusion(counts, names, split, int(cfg["zoom_classes"]))
        pairs = confused_pairs(counts, names, int(cfg["top_pairs"]))
        _log_pairs(pairs, split)
        per_class = per_class_table(counts, names)
        _log_per_class(per_class, int(cfg["worst_classes"]), split)
        errors = _error_table(result, splits.tables[split], names)
        log_csv(errors, f"tables/errors_{split}.csv")
        metrics.update(_log_calibration(result, int(cfg["calibration_bins"]), split))
        shares, relation_table = fine_grained_shares(counts, names)
        metrics.update(shares)
        log_csv(relation_table, "tables/error_relations.csv", as_table=True)
        _log_gallery(result, data, splits, names, int(cfg["gallery"]), int(cfg["seed"]), split)
        mlflow.log_metrics(metrics)
        return ErrorReport(active.info.run_id, split, result, metrics, pairs, per_class, errors, order)


def _log_confusion(counts: np.ndarray, names: list[str], split: str, zoom: int) -> np.ndarray:
    order = cluster_order(counts)
    ordered_names = [names[i] for i in order]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    log_figure(figures.confusion_heatmap(rates[np.ix_(order, order)], ordered_names, hide_diagonal=True,
                                         title=f"Confusion ({split}, row-normalised, diagonal hidden), classes "
                                               f"ordered so confusable ones sit together"),
               f"figures/confusion_clustered_{split}.png")
    block = most_confused_block(counts, order, zoom)
    log_figure(figures.confusion_heatmap(counts[np.ix_(block, block)], [names[i] for i in block], annotate=True,
                                         title=f"Most-confused block of {len(block)} classes ({split}, image counts)"),
               f"figures/confusion_zoom_{split}.png")
    log_csv(pd.DataFrame(counts, index=names, columns=names).reset_index(names="true\\predicted"),
            f"tables/confusion_matrix_{split}.csv")
    log_csv(pd.DataFrame(counts[np.ix_(order, order)], index=ordered_names, columns=ordered_names)
            .reset_index(names="true\\predicted"), f"tables/confusion_matrix_{split}_clustered.csv")
    return order


def _log_pairs(pairs: pd.DataFrame, split: str) -> None:
    log_csv(pairs, f"tables/confused_pairs_{split}.csv", as_table=True)
    if pairs.empty:
        return
    log_figure(figures.bar_chart(pairs["pair"].tolist(), pairs["count"].tolist(),
                                 f"Most-confused class pairs ({split}): true → predicted", "images",
                                 annotations=pairs["relation"].str.replace("_", " ").tolist()),
               f"figures/confused_pairs_{split}.png")


def _log_per_class(per_class: pd.DataFrame, worst: int, split: str) -> None:
    log_csv(per_class, f"tables/per_class_{split}.csv", as_table=True)
    rows = per_class[per_class["support"] > 0].sort_values(["accuracy", "f1"], kind="stable").head(worst)
    notes = [f"{r.correct}/{r.support}" + (f", often → {r.most_confused_with}" if r.most_confused_with else "")
             for r in rows.itertuples()]
    log_figure(figures.bar_chart(rows["class_name"].tolist(), rows["accuracy"].tolist(),
                                 f"Worst {len(rows)} classes ({split} accuracy)", "accuracy", annotations=notes,
                                 color="tab:orange"), f"figures/worst_classes_{split}.png")


def _error_table(result: EvalResult, rows: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    wrong = np.flatnonzero(result.preds != result.labels)
    true, pred = result.labels[wrong], result.preds[wrong]
    return pd.DataFrame({
        "position": wrong, "fname": rows["fname"].to_numpy()[wrong],
        "true_id": true, "true_class": [names[t] for t in true],
        "predicted_id": pred, "predicted_class": [names[p] for p in pred],
        "confidence": result.probs[wrong, pred], "true_class_probability": result.probs[wrong, true],
        "relation": [relation(names[t], names[p]) for t, p in zip(true, pred, strict=True)],
    }).sort_values("confidence", ascending=False, kind="stable")


def _log_calibration(result: EvalResult, bins: int, split: str) -> dict[str, float]:
    ece, table = calibration(result.probs, result.labels, bins)
    conf = result.probs.max(axis=1)
    correct = result.preds == result.labels
    log_csv(table, f"tables/calibration_{split}.csv")
    log_figure(figures.confidence_histogram(conf[correct], conf[~correct], f"Top-1 confidence ({split})"),
               f"figures/confidence_histogram_{split}.png")
    log_figure(figures.reliability_diagram(table, ece, f"Reliability diagram ({split}), ECE {ece:.3f}"),
               f"figures/reliability_diagram_{split}.png")
    nan = float("nan")
    return {"ece": ece, "mean_confidence": float(conf.mean()),
            "mean_confidence_correct": float(conf[correct].mean()) if correct.any() else nan,
            "mean_confidence_wrong": float(conf[~correct].mean()) if (~correct).any() else nan}


def gallery_picks(result: EvalResult, n: int) -> list[int]:
    """Positions of up to `n` misclassified images: the most confident mistakes, one per (true, predicted) pair
    first so one frequent confusion does not fill the gallery, then the next most confident ones."""
    wrong = np.flatnonzero(result.preds != result.labels)
    wrong = wrong[np.argsort(-result.probs[wrong, result.preds[wrong]], kind="stable")]
    seen, first, rest = set(), [], []
    for pos in wrong:
        pair = (int(result.labels[pos]), int(result.preds[pos]))
        (rest if pair in seen else first).append(int(pos))
        seen.add(pair)
    return (first + rest)[:n]


def _log_gallery(result: EvalResult, data: ArrayData, splits: Splits, names: list[str], n: int, seed: int,
                 split: str) -> None:
    picks = gallery_picks(result, n)
    if not picks:
        return
    rng = np.random.default_rng(seed)
    train_labels = splits.train.targets
    images, _ = data.read(np.asarray(picks))
    items = []
    for image, pos in zip(images, picks, strict=True):
        pred = int(result.preds[pos])
        candidates = np.flatnonzero(train_labels == pred)
        example = splits.train.read(np.asarray([rng.choice(candidates)]))[0][0] if candidates.size else \
            np.zeros_like(image)
        items.append((image, example, names[int(result.labels[pos])], names[pred],
                      float(result.probs[pos, pred])))
    log_figure(figures.error_gallery(items, f"Misclassified {split} images (left) beside a training image of the "
                                            f"class they were taken for (right)"),
               f"figures/misclassified_gallery_{split}.png")
