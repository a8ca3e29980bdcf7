"""Study row 11 — a trained network without its classifier as a feature extractor, then a RandomForest head.

From a source training run (`run_id`, default: the best finished `transfer` run of `model` by validation accuracy)
the network's penultimate-layer features (`forward_head(forward_features(x), pre_logits=True)`) are extracted once
for the source run's own train / val / test images (its data and its train/val split rebuilt from its params) and
stored with the run (`features/{train,val,test}.npz`, with labels and the network's logits), so heads can be refit
without re-extracting. A RandomForest (the study's: 100 trees, random_state 42) is fitted on the train features,
with logistic-regression and k-nearest-neighbour heads for context; validation and test are only reported.

Logged: accuracy and macro / weighted precision, recall and F1 per head and split (`rf_test_acc`, `rf_val_acc`,
`logreg_test_acc`, `knn_test_acc`, `rf_test_macro_f1`, ...), the RandomForest's classification reports, the network's
own accuracy on the same images and how its errors overlap the forest's, and two models: `rf_head` (the forest alone,
sklearn flavour, skops format: features in, class out) and `rf_model` (images in, labels out; `pyfunc_rf.py`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.entities import Run  # mlflow: the type of the runs this module reads (through tracking.search)
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, classification_report, precision_recall_fscore_support
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from torch import nn

from carsml.data.splits import membership_table, train_val_split
from carsml.data.table import Dataset
from carsml.data.transforms import BatchTransform, build_transform
from carsml.engine.device import resolve_device
from carsml.engine.evaluate import predict
from carsml.engine.loader import ArrayData
from carsml.errors import CarsmlError, ConfigError, DataError
from carsml.experiments.common import limit_classes, resolve_dataset
from carsml.experiments.markdown import frame_markdown
from carsml.experiments.train import decode
from carsml.tracking import tags as tag
from carsml.tracking.forest import log_rf_head, log_rf_model
from carsml.tracking.models import load_model, resolve_model_uri
from carsml.tracking.runs import log_artifacts, log_csv, log_dataset, log_metrics, log_text, setup_tracking, start_run
from carsml.tracking.search import config_from_run, get_run, search_runs, searched_experiment, tracking_uri

HEADS = ("rf", "logreg", "knn")
# the source run's options that rebuild its data and its train/val split
DATA_KEYS = ("data", "synth_classes", "synth_images_per_class", "synth_seed", "cache_dir", "image_size", "use_boxes",
             "crop_margin", "skip_unreadable", "max_classes", "val_fraction", "seed")


@dataclass
class Features:
    """Penultimate-layer features of one split, with labels, the network's logits and the image file names."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    logits: np.ndarray  # (N, C) float32, the end-to-end network's outputs for the same images
    fname: np.ndarray  # (N,) str

    def subset(self, idx: np.ndarray) -> Features:
        return Features(self.features[idx], self.labels[idx], self.logits[idx], self.fname[idx])

    def save(self, path: Path) -> None:
        np.savez(path, features=self.features, labels=self.labels, logits=self.logits, fname=self.fname)

    @classmethod
    def load(cls, path: str | Path) -> Features:
        """Read a `features/<split>.npz` artifact back."""
        with np.load(path) as z:
            return cls(z["features"], z["labels"], z["logits"], z["fname"])


@dataclass
class FeaturesRF:
    """What a features_rf run produced."""

    run_id: str
    backbone_run_id: str
    metrics: dict[str, float]
    rf_head_uri: str
    rf_model_uri: str


# ------------------------------------------------------------------------------------------------ checks


def check_options(cfg: dict[str, Any]) -> None:
    """Raise ConfigError naming the first invalid head / extraction option."""
    positive = ("n_estimators", "logreg_max_iter", "knn_k", "batch_size")
    for key in positive:
        if cfg[key] < 1:
            raise ConfigError(f"{key}: expected a positive integer; got {cfg[key]!r}")
    if cfg["max_depth"] is not None and cfg["max_depth"] < 1:
        raise ConfigError(f"max_depth: expected a positive integer (empty = unlimited); got {cfg['max_depth']!r}")
    if cfg["logreg_c"] <= 0:
        raise ConfigError(f"logreg_c: expected a positive number; got {cfg['logreg_c']!r}")
    if cfg["n_jobs"] == 0:
        raise ConfigError("n_jobs: expected a positive number of jobs or -1 (all cores); got 0")
    resolve_device(cfg["device"])


def best_transfer_run(experiment_name: str, model: str) -> Run:
    """The finished `transfer` run tagged carsml.model=`model` with the best validation accuracy (ties: lower val
    loss); CarsmlError when the experiment holds none."""
    searched, where = searched_experiment(experiment_name)
    query = (f"tags.`{tag.ENTRY_POINT}` = 'transfer' and tags.`{tag.MODEL}` = '{model}' "
             f"and attributes.status = 'FINISHED'")
    runs = search_runs([searched], query, order_by=["metrics.best_val_acc DESC", "metrics.best_val_loss ASC"],
                       max_results=1) if searched else []
    if not runs:
        raise CarsmlError(f"features_rf: no finished transfer run with carsml.model={model!r} in {where} "
                          f"(tracking URI {tracking_uri()}); train one with "
                          f"`carsml transfer --model {model}`, or pass --run-id <a training run>")
    return runs[0]


def source_run(cfg: dict[str, Any]) -> Run:
    """The run whose network gives the features (`run_id`, or the best transfer run of `model`)."""
    if not cfg["run_id"]:
        return best_transfer_run(cfg["experiment_name"], cfg["model"])
    return get_run(cfg["run_id"], "run_id")


def check_backbone(model: nn.Module, image_size: int, where: str) -> int:
    """Check that `model` gives pre-logit features (2-D, one row per image); return their width."""
    for method in ("forward_features", "forward_head"):
        if not callable(getattr(model, method, None)):
            raise CarsmlError(f"{where}: its network ({type(model).__name__}) has no {method}(); features_rf needs "
                              f"forward_features / forward_head(x, pre_logits=True), as timm models and ours have")
    probe = torch.zeros(2, 3, image_size, image_size)
    try:
        with torch.inference_mode():
            out = model.eval().forward_head(model.forward_features(probe), pre_logits=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the network cannot serve as a backbone
        raise CarsmlError(f"{where}: forward_head(forward_features(x), pre_logits=True) fails on its "
                          f"network ({type(model).__name__}): {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CarsmlError(f"{where}: pre-logit features of its network are {shape}, expected (images, features)")
    return int(out.shape[1])


def source_data_config(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    """The source run's data options (typed), with this run's `data` / `cache_dir` overrides."""
    missing = [k for k in DATA_KEYS if k not in run.data.params]
    if missing:
        raise CarsmlError(f"run {run.info.run_id}: lacks the param(s) {', '.join(missing)} that rebuild its data "
                          f"and train/val split; pass a run of a carsml training entry point")
    source_cfg = config_from_run(run)
    out = {k: source_cfg[k] for k in DATA_KEYS}
    for key in ("data", "cache_dir"):
        if cfg[key]:
            out[key] = cfg[key]
    return out


def load_backbone(run: Run) -> tuple[nn.Module, dict[str, Any]]:
    """The source run's network and bundle info; CarsmlError for runs that are not a usable backbone."""
    run_id, tags = run.info.run_id, run.data.tags
    where = f"run {run_id} ({tags.get('carsml.entry_point', 'not a carsml run')})"
    if run.info.status != "FINISHED":
        raise CarsmlError(f"{where}: status {run.info.status}; features_rf needs a finished training run")
    if tag.FOLD in tags:
        raise CarsmlError(f"{where}: a k-fold child; features_rf rebuilds a train/val split from the run's seed, "
                          f"which a fold's split is not; pass a transfer, baseline or improved run")
    resolve_model_uri(run_id)  # CarsmlError naming the run when it holds no carsml model
    model, info = load_model(run_id)
    check_backbone(model, int(info["image_size"]), where)
    return model, info


# -------------------------------------------------------------------------------------------- extraction


def extract_features(model: nn.Module, data: ArrayData, fnames: np.ndarray, transform: BatchTransform, *,
                     batch_size: int, device: str, amp: str) -> Features:
    """One forward pass of the backbone per image (the engine's `predict`, as the served rf_model does):
    pre-logit features and the network's own logits."""
    out = predict(model, data, transform, batch_size=batch_size, device=device, amp=amp, features=True)
    return Features(out.features, data.targets.copy(), out.logits, np.asarray(fnames, dtype=str))


# ------------------------------------------------------------------------------------------------- heads


def make_heads(cfg: dict[str, Any]) -> dict[str, Any]:
    """The RandomForest (the study's settings by default) and two context heads, unfitted."""
    return {
        "rf": RandomForestClassifier(n_estimators=cfg["n_estimators"], max_depth=cfg["max_depth"],
                                     random_state=cfg["random_state"], n_jobs=cfg["n_jobs"]),
        # standardised features: lbfgs converges far faster, and C means the same for every backbone
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(C=cfg["logreg_c"],
                                                                     max_iter=cfg["logreg_max_iter"],
                                                                     random_state=cfg["random_state"])),
        # L2-normalised features: Euclidean neighbours are then cosine neighbours
        "knn": make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=cfg["knn_k"], n_jobs=cfg["n_jobs"])),
    }


def scores(labels: np.ndarray, preds: np.ndarray, prefix: str) -> dict[str, float]:
    """Accuracy and macro / weighted precision, recall and F1, named `<prefix>_<metric>`."""
    out = {f"{prefix}_acc": float(accuracy_score(labels, preds))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, average=average, zero_division=0)
        out.update({f"{prefix}_{average}_precision": float(p), f"{prefix}_{average}_recall": float(r),
                    f"{prefix}_{average}_f1": float(f)})
    return out


def overlap(labels: np.ndarray, net_preds: np.ndarray, rf_preds: np.ndarray) -> dict[str, int]:
    """How the network's errors and the forest's errors overlap (image counts)."""
    net_wrong, rf_wrong = net_preds != labels, rf_preds != labels
    return {"both_wrong": int((net_wrong & rf_wrong).sum()), "only_net_wrong": int((net_wrong & ~rf_wrong).sum()),
            "only_rf_wrong": int((~net_wrong & rf_wrong).sum()), "both_right": int((~net_wrong & ~rf_wrong).sum())}


def _report(labels: np.ndarray, preds: np.ndarray, class_names: list[str], split: str) -> None:
    ids = np.arange(len(class_names))
    kwargs = {"labels": ids, "target_names": class_names, "zero_division": 0}
    log_text(classification_report(labels, preds, digits=4, **kwargs), f"reports/rf_{split}_classification_report.txt")
    table = pd.DataFrame(classification_report(labels, preds, output_dict=True, **kwargs)).T
    log_csv(table.reset_index(names="class"), f"tables/rf_{split}_classification_report.csv")


def evaluate_heads(heads: dict[str, Any], splits: dict[str, Features], class_names: list[str]) -> dict[str, float]:
    """Metrics of every head and of the network on val / test; reports, per-image predictions and error overlap."""
    metrics: dict[str, float] = {}
    rows = []
    for split in ("val", "test"):
        if split not in splits:
            continue
        feats = splits[split]
        net_preds = feats.logits.argmax(axis=1)
        metrics.update(scores(feats.labels, net_preds, f"net_{split}"))
        preds = {name: head.predict(feats.features) for name, head in heads.items()}
        for name, pred in preds.items():
            metrics.update(scores(feats.labels, pred, f"{name}_{split}"))
        metrics.update({f"rf_net_{split}_{k}": float(v) for k, v in overlap(feats.labels, net_preds,
                                                                             preds["rf"]).items()})
        _report(feats.labels, preds["rf"], class_names, split)
        log_csv(pd.DataFrame({"fname": feats.fname, "label": feats.labels, "net_pred": net_preds,
                              **{f"{name}_pred": p for name, p in preds.items()}}), f"tables/predictions_{split}.csv")
    for name in ("net", *heads):
        rows.append({"head": name, **{f"{split}_{m}": metrics.get(f"{name}_{split}_{m}", np.nan)
                                      for split in ("val", "test") for m in ("acc", "macro_f1", "weighted_f1")}})
    table = pd.DataFrame(rows)
    log_csv(table, "tables/heads.csv")
    log_text(frame_markdown(table), "tables/heads.md")
    return metrics


# ---------------------------------------------------------------------------------------------- models


# ------------------------------------------------------------------------------------------------- entry


def _check_data(dataset: Dataset, info: dict[str, Any], run_id: str) -> None:
    if list(dataset.class_names) != list(info["class_names"]):
        raise DataError(f"run {run_id}: its network was trained on {len(info['class_names'])} classes that differ "
                        f"from the {dataset.num_classes} of dataset {dataset.root}; pass the data it was trained on")


def run(cfg: dict[str, Any]) -> FeaturesRF:
    """Extract the source network's features once, fit the heads on train, report val / test, log both models."""
    setup_tracking()
    check_options(cfg)
    source = source_run(cfg)
    source_id = source.info.run_id
    model, info = load_backbone(source)
    data_cfg = source_data_config(source, cfg)
    dataset = limit_classes(resolve_dataset(data_cfg), data_cfg["max_classes"])
    _check_data(dataset, info, source_id)
    backbone = source.data.tags.get(tag.MODEL) or info["model_config"]["name"]
    tags = {tag.BACKBONE_RUN_ID: source_id, tag.SOURCE_RUN_ID: source_id, tag.MODEL: backbone}
    with start_run(cfg["entry_point"], cfg, run_name=f"features_rf-{backbone}", tags=tags) as active:
        train_rows, test_rows = decode(data_cfg, dataset, "train"), decode(data_cfg, dataset, "test")
        if train_rows is None:
            raise DataError(f"dataset {dataset.root}: no images in the official train split")
        train_idx, val_idx = train_val_split(train_rows.labels, data_cfg["val_fraction"], data_cfg["seed"])
        if len(train_idx) < cfg["knn_k"]:
            raise ConfigError(f"knn_k={cfg['knn_k']}: more neighbours than training images ({len(train_idx)})")
        log_dataset(dataset, train_rows.table, "train")
        if test_rows is not None:
            log_dataset(dataset, test_rows.table, "test")
        log_csv(membership_table(train_rows.table["fname"], {"train": train_idx, "val": val_idx}),
                "data/split_membership.csv")

        transform = build_transform("none", mean=info["mean"], std=info["std"])
        kwargs = {"batch_size": cfg["batch_size"], "device": cfg["device"], "amp": cfg["amp"]}
        official = extract_features(model, ArrayData(train_rows.images, train_rows.labels),
                                    train_rows.table["fname"].to_numpy(), transform, **kwargs)
        splits = {"train": official.subset(train_idx), "val": official.subset(val_idx)}
        if test_rows is not None:
            splits["test"] = extract_features(model, ArrayData(test_rows.images, test_rows.labels),
                                              test_rows.table["fname"].to_numpy(), transform, **kwargs)
        with tempfile.TemporaryDirectory() as tmp:
            for split, feats in splits.items():
                feats.save(Path(tmp) / f"{split}.npz")
            log_artifacts(tmp, "features")
        log_metrics({"feature_dim": float(official.features.shape[1]),
                            **{f"{s}_images": float(len(f.labels)) for s, f in splits.items()}})

        heads = make_heads(cfg)
        for head in heads.values():
            head.fit(splits["train"].features, splits["train"].labels)
        metrics = evaluate_heads(heads, splits, dataset.class_names)
        log_metrics(metrics)

        rf_head_uri = log_rf_head(heads["rf"], splits["train"].features[:2])
        examples = test_rows.images[:2] if test_rows is not None else train_rows.images[val_idx[:2]]
        rf_model_uri = log_rf_model(model, info, heads["rf"], np.asarray(examples),
                                    {"head": "random_forest", "backbone_run_id": source_id,
                                     "features_rf_run_id": active.info.run_id})
        return FeaturesRF(active.info.run_id, source_id, metrics, rf_head_uri, rf_model_uri)
