"""Study rows 3 and 6 — stratified k-fold cross-validation: a parent run plus one nested child run per fold.

Each fold trains a fresh model on k-1 folds, selects on the held-out fold, and is evaluated on the official test split
(as the study did). The parent logs cv_<metric>_mean/_std, a per-fold table, the mean-across-folds curves and the
summed test confusion matrix. Folds share the decoded cache. Resuming a parent (`resume_run_id`) keeps finished folds
and continues the others from their checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from carsml.data.splits import kfold_splits, membership_table
from carsml.engine.device import seed_everything
from carsml.engine.loader import ArrayData
from carsml.errors import CarsmlError
from carsml.experiments.common import cache_root, limit_classes, model_kwargs, resolve_dataset
from carsml.experiments.train import augment_images, decode, epoch_key, fit_and_log, train_config
from carsml.models.factory import create_model
from carsml.progress import planned_fits
from carsml.tracking import figures
from carsml.tracking.runs import log_csv, log_dataset, log_figure, setup_tracking, start_run

CV_METRICS = ("best_val_acc", "best_val_loss", "test_acc", "test_loss", "test_top5", "test_macro_f1", "train_seconds")


def _finished_folds(parent_id: str) -> dict[int, Any]:
    """Child runs of a parent by fold index."""
    client = MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {int(r.data.tags["carsml.fold"]): r for r in children if "carsml.fold" in r.data.tags}


def run(cfg: dict[str, Any]) -> pd.DataFrame:
    """Cross-validate the configured model; returns the per-fold table."""
    setup_tracking()
    train_config(cfg)
    k = cfg["folds"]
    dataset = limit_classes(resolve_dataset(cfg), cfg["max_classes"])
    create_model(cfg["model"], dataset.num_classes, cfg["image_size"], **model_kwargs(cfg))  # validate options
    kfold_splits(dataset.split("train")["label"].to_numpy(), k, cfg["seed"])  # validate k before a run exists
    previous = _finished_folds(cfg["resume_run_id"]) if cfg["resume_run_id"] else {}
    with start_run(cfg["entry_point"], cfg, run_name=f"{cfg['entry_point']}-{cfg['model']}",
                   resume_run_id=cfg["resume_run_id"]) as parent:
        train_rows, test_rows = decode(cfg, dataset, "train"), decode(cfg, dataset, "test")
        folds = kfold_splits(train_rows.labels, k, cfg["seed"])  # validates k before any training
        if not cfg["resume_run_id"]:
            log_dataset(dataset, train_rows.table, "train")
            if test_rows is not None:
                log_dataset(dataset, test_rows.table, "test")
            held_out = {f"val_fold{i}": va for i, (_, va) in enumerate(folds)}
            log_csv(membership_table(train_rows.table["fname"], held_out), "data/fold_membership.csv")
        all_train = ArrayData(train_rows.images, train_rows.labels)
        augment_rows = augment_images(cfg, dataset, train_rows)
        augment = ArrayData(augment_rows.images, augment_rows.labels)
        test = ArrayData(test_rows.images, test_rows.labels) if test_rows is not None else None
        rows, histories, confusion = [], [], None
        with planned_fits(k - sum(r.info.status == "FINISHED" for r in previous.values()), "fold"):
            for fold, (train_idx, val_idx) in enumerate(folds):
                child = previous.get(fold)
                if child is not None and child.info.status == "FINISHED":
                    rows.append({"fold": fold, "run_id": child.info.run_id,
                                 **{m: child.data.metrics.get(m, np.nan) for m in CV_METRICS}})
                    histories.append(_history_of(child.info.run_id))
                    continue
                ckpt_tag = child.data.tags.get("carsml.checkpoint_dir", "") if child is not None else ""
                resume = bool(ckpt_tag) and (Path(ckpt_tag) / "last.pt").is_file()
                with start_run(cfg["entry_point"], cfg, run_name=f"{cfg['entry_point']}-fold{fold}", nested=True,
                               resume_run_id=child.info.run_id if resume else "",
                               tags={"carsml.fold": str(fold), "carsml.parent_run_id": parent.info.run_id,
                                     "carsml.model": cfg["model"]}) as fold_run:
                    ckpt = cache_root(cfg) / "checkpoints" / fold_run.info.run_id
                    mlflow.set_tag("carsml.checkpoint_dir", str(ckpt))
                    seed_everything(cfg["seed"] + fold)  # each fold's initial weights repeat
                    model = create_model(cfg["model"], dataset.num_classes, cfg["image_size"], **model_kwargs(cfg))
                    trained = fit_and_log(cfg, model, dataset.class_names, augment.subset(train_idx),
                                          all_train.subset(val_idx), test, checkpoint_dir=ckpt, resume=resume,
                                          info_extra={"fold": fold})
                rows.append({"fold": fold, "run_id": fold_run.info.run_id,
                             **{m: trained.finals.get(m, np.nan) for m in CV_METRICS}})
                histories.append(trained.history)
                if trained.test is not None:
                    from sklearn.metrics import confusion_matrix

                    counts = confusion_matrix(trained.test.labels, trained.test.preds,
                                              labels=np.arange(dataset.num_classes))
                    confusion = counts if confusion is None else confusion + counts
        table = pd.DataFrame(rows)
        _log_summary(table, histories, cfg)
        if confusion is not None:
            _log_summed_confusion(confusion, dataset.class_names)
    return table


def _history_of(run_id: str) -> pd.DataFrame:
    """Per-epoch metrics of a finished child run, read back from MLflow."""
    client = MlflowClient()
    data: dict[int, dict[str, float]] = {}
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
        for m in client.get_metric_history(run_id, epoch_key(key)):
            data.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return pd.DataFrame(sorted(data.values(), key=lambda r: r["epoch"]))


def _log_summary(table: pd.DataFrame, histories: list[pd.DataFrame], cfg: dict[str, Any]) -> None:
    summary = {}
    for metric in CV_METRICS:
        if metric in table and table[metric].notna().any():
            summary[f"cv_{metric}_mean"] = float(table[metric].mean())
            summary[f"cv_{metric}_std"] = float(table[metric].std(ddof=0))
    mlflow.log_metrics(summary)
    log_csv(table, "tables/folds.csv", as_table=True)
    # mean curves over the epochs every fold reached (early stopping can shorten some folds)
    stacked = pd.concat(histories, keys=range(len(histories)), names=["fold"]).reset_index(level=0)
    common = stacked.groupby("epoch")["fold"].nunique()
    stacked = stacked[stacked["epoch"].isin(common[common == len(histories)].index)]
    cols = [c for c in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc") if c in stacked]
    mean = stacked.groupby("epoch")[cols].mean().reset_index()
    std = stacked.groupby("epoch")[cols].std(ddof=0).reset_index()
    for row in mean.itertuples(index=False):
        mlflow.log_metrics({f"mean_{c}": float(getattr(row, c)) for c in cols}, step=int(row.epoch))
    log_csv(mean, "tables/mean_curves.csv")
    log_figure(figures.training_curves(mean, std=std, title=f"{cfg['model']}: mean ± std over {len(histories)} folds"),
               "figures/mean_curves.png")
    if not summary:
        raise CarsmlError("No fold produced metrics.")


def _log_summed_confusion(counts: np.ndarray, class_names: list[str]) -> None:
    norm = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    log_figure(figures.confusion_matrix(norm, class_names, title="Test confusion matrix, all folds (row-normalised)"),
               "figures/confusion_matrix_test.png")
    log_csv(pd.DataFrame(counts, index=class_names, columns=class_names).reset_index(names="true\\predicted"),
            "tables/confusion_matrix_test.csv")
