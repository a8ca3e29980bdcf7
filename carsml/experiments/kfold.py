"""Study rows 3 and 6 — stratified k-fold cross-validation: a parent run plus one nested child run per fold.

Each fold trains a fresh model on k-1 folds, selects on the held-out fold, and is evaluated on the official test split
(as the study did). The parent logs cv_<metric>_mean/_std, a per-fold table, the mean-across-folds curves and the
summed test confusion matrix. Folds share the decoded cache. Resuming a parent (`resume_run_id`) keeps finished folds
and continues the others from their checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carsml.data.splits import kfold_splits, membership_table
from carsml.engine.device import seed_everything
from carsml.engine.loader import ArrayData
from carsml.errors import CarsmlError
from carsml.experiments.analysis import confusion_counts
from carsml.experiments.common import build_model, cache_root, limit_classes, resolve_dataset
from carsml.experiments.train import augment_images, decode, fit_and_log, train_config
from carsml.progress import planned_fits
from carsml.tracking import figures
from carsml.tracking import tags as tag
from carsml.tracking.artifacts import log_confusion_matrix
from carsml.tracking.checkpoints import fetch_checkpoints
from carsml.tracking.epochs import epoch_key
from carsml.tracking.runs import (
    describe,
    log_csv,
    log_dataset,
    log_figure,
    log_metrics,
    set_tags,
    setup_tracking,
    start_run,
)
from carsml.tracking.search import child_runs, get_run, metric_history

CV_METRICS = ("best_val_acc", "best_val_loss", "test_acc", "test_loss", "test_top5", "test_macro_f1", "train_seconds")


def _finished_folds(parent_id: str) -> dict[int, Any]:
    """Child runs of a parent by fold index."""
    children = child_runs(get_run(parent_id, "resume_run_id"))
    return {int(r.data.tags[tag.FOLD]): r for r in children if tag.FOLD in r.data.tags}


def run(cfg: dict[str, Any]) -> pd.DataFrame:
    """Cross-validate the configured model; returns the per-fold table."""
    setup_tracking()
    train_config(cfg)
    k = cfg["folds"]
    dataset = limit_classes(resolve_dataset(cfg), cfg["max_classes"])
    build_model(cfg, dataset.num_classes)  # the model options fail here, before any run exists
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
                ckpt_tag = child.data.tags.get(tag.CHECKPOINT_DIR, "") if child is not None else ""
                resume = child is not None and (
                    (bool(ckpt_tag) and (Path(ckpt_tag) / "last.pt").is_file())
                    or fetch_checkpoints(child.info.run_id, cache_root(cfg) / "checkpoints" / child.info.run_id))
                with start_run(cfg["entry_point"], cfg, run_name=f"fold {fold} · {cfg['model']}", nested=True,
                               resume_run_id=child.info.run_id if resume else "",
                               tags={tag.FOLD: str(fold), tag.PARENT_RUN_ID: parent.info.run_id,
                                     tag.MODEL: cfg["model"]}) as fold_run:
                    ckpt = cache_root(cfg) / "checkpoints" / fold_run.info.run_id
                    set_tags({tag.CHECKPOINT_DIR: ckpt})
                    if not resume:  # the fold's own data inputs, so its model's metrics name their dataset
                        log_dataset(dataset, train_rows.table, "train")
                        if test_rows is not None:
                            log_dataset(dataset, test_rows.table, "test")
                    seed_everything(cfg["seed"] + fold)  # each fold's training randomness repeats
                    model = build_model(cfg, dataset.num_classes, seed=cfg["seed"] + fold)
                    trained = fit_and_log(cfg, model, dataset.class_names, augment.subset(train_idx),
                                          all_train.subset(val_idx), test, checkpoint_dir=ckpt, resume=resume,
                                          info_extra={"fold": fold})
                rows.append({"fold": fold, "run_id": fold_run.info.run_id,
                             **{m: trained.finals.get(m, np.nan) for m in CV_METRICS}})
                histories.append(trained.history)
                if trained.test is not None:
                    counts = confusion_counts(trained.test.labels, trained.test.preds, dataset.num_classes)
                    confusion = counts if confusion is None else confusion + counts
        table = pd.DataFrame(rows)
        _log_summary(table, histories, cfg)
        if confusion is not None:
            log_confusion_matrix(confusion, dataset.class_names, "test",
                                 "Test confusion matrix, all folds (row-normalised)")
    return table


def _history_of(run_id: str) -> pd.DataFrame:
    """Per-epoch metrics of a finished child run, read back from MLflow."""
    data: dict[int, dict[str, float]] = {}
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
        for step, value in metric_history(run_id, epoch_key(key)):
            data.setdefault(step, {"epoch": step})[key] = value
    return pd.DataFrame(sorted(data.values(), key=lambda r: r["epoch"]))


def _log_summary(table: pd.DataFrame, histories: list[pd.DataFrame], cfg: dict[str, Any]) -> None:
    summary = {}
    for metric in CV_METRICS:
        if metric in table and table[metric].notna().any():
            summary[f"cv_{metric}_mean"] = float(table[metric].mean())
            summary[f"cv_{metric}_std"] = float(table[metric].std(ddof=0))
    log_metrics(summary)
    if "cv_test_acc_mean" in summary:
        describe(f"{len(table)}-fold CV of {cfg['model']} · test acc {summary['cv_test_acc_mean']:.4f} ± "
                 f"{summary['cv_test_acc_std']:.4f} (mean ± std over the folds)")
    log_csv(table, "tables/folds.csv", as_table=True)
    # mean curves over the epochs every fold reached (early stopping can shorten some folds)
    stacked = pd.concat(histories, keys=range(len(histories)), names=["fold"]).reset_index(level=0)
    common = stacked.groupby("epoch")["fold"].nunique()
    stacked = stacked[stacked["epoch"].isin(common[common == len(histories)].index)]
    cols = [c for c in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc") if c in stacked]
    mean = stacked.groupby("epoch")[cols].mean().reset_index()
    std = stacked.groupby("epoch")[cols].std(ddof=0).reset_index()
    for row in mean.itertuples(index=False):
        log_metrics({f"mean_{c}": getattr(row, c) for c in cols}, step=int(row.epoch))
    log_csv(mean, "tables/mean_curves.csv")
    log_figure(figures.training_curves(mean, std=std, title=f"{cfg['model']}: mean ± std over {len(histories)} folds"),
               "figures/mean_curves.png")
    if not summary:
        raise CarsmlError("No fold produced metrics.")
