"""Study rows 3 and 6 — stratified k-fold cross-validation: a parent run plus one nested child run per fold.

Each fold trains a fresh model on k-1 folds, selects on the held-out fold, and is evaluated on the official test split
(as the study did). The parent logs cv_<metric>_mean/_std, a per-fold table, the mean-across-folds curves and the
summed test confusion matrix. Folds share the decoded cache. Resuming a parent (`resume_run_id`) keeps finished folds
and continues the others from their checkpoints. `folds_parallel=N` trains up to N folds at once, each in a worker
process of its own (a child run started there under the parent); the parent assembles the same artefacts. Under torchrun
(`nproc` > 1) each fold is one model trained by all the processes (DDP): rank 0 runs everything below, the others
follow it fold by fold (`fold_replica`).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from carsml.config import load_config
from carsml.data.cache import DecodedImages
from carsml.data.splits import kfold_splits, membership_table
from carsml.data.table import Dataset
from carsml.engine import distributed
from carsml.engine.device import seed_everything
from carsml.engine.loader import ArrayData
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments.analysis import confusion_counts
from carsml.experiments.common import build_model, cache_root, limit_classes, resolve_dataset
from carsml.experiments.train import augment_images, decode, fit_and_log, join_processes, replica_fit, train_config
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


@dataclass
class FoldData:
    """What every fold trains and is evaluated on: the (cached) official splits and the k folds."""

    dataset: Dataset
    train_rows: DecodedImages
    test_rows: DecodedImages | None
    augment: ArrayData  # the train split as the augmentation reads it (`cache_scale`)
    folds: list[tuple[np.ndarray, np.ndarray]]

    @classmethod
    def load(cls, cfg: dict[str, Any], dataset: Dataset) -> FoldData:
        train_rows, test_rows = decode(cfg, dataset, "train"), decode(cfg, dataset, "test")
        augment_rows = augment_images(cfg, dataset, train_rows)
        return cls(dataset, train_rows, test_rows, ArrayData(augment_rows.images, augment_rows.labels),
                   kfold_splits(train_rows.labels, cfg["folds"], cfg["seed"]))

    def val(self, fold: int) -> ArrayData:
        """Fold `fold`'s held-out images, at the evaluation size."""
        return ArrayData(self.train_rows.images, self.train_rows.labels).subset(self.folds[fold][1])


@dataclass
class FoldOutcome:
    """One fold's row of the per-fold table, its curves and its test confusion counts."""

    row: dict[str, Any]
    history: pd.DataFrame
    confusion: np.ndarray | None


def run(cfg: dict[str, Any]) -> pd.DataFrame:
    """Cross-validate the configured model; returns the per-fold table."""
    tracking_uri = setup_tracking()
    train_config(cfg)
    k, parallel = cfg["folds"], cfg["folds_parallel"]
    check_parallel(parallel, str(cfg["device"]), cfg.get("nproc", 1))
    here = join_processes(cfg)
    dataset = limit_classes(resolve_dataset(cfg), cfg["max_classes"])
    build_model(cfg, dataset.num_classes)  # the model options fail here, before any run exists
    kfold_splits(dataset.split("train")["label"].to_numpy(), k, cfg["seed"])  # validate k before a run exists
    if not here.main:
        fold_replica(cfg, dataset)
        return pd.DataFrame()
    previous = _finished_folds(cfg["resume_run_id"]) if cfg["resume_run_id"] else {}
    with start_run(cfg["entry_point"], cfg, run_name=f"{cfg['entry_point']}-{cfg['model']}",
                   resume_run_id=cfg["resume_run_id"]) as parent:
        data = FoldData.load(cfg, dataset)
        distributed.barrier()  # DDP replicas wait here for the cache
        if not cfg["resume_run_id"]:
            log_dataset(dataset, data.train_rows.table, "train")
            if data.test_rows is not None:
                log_dataset(dataset, data.test_rows.table, "test")
            held_out = {f"val_fold{i}": va for i, (_, va) in enumerate(data.folds)}
            log_csv(membership_table(data.train_rows.table["fname"], held_out), "data/fold_membership.csv")
        outcomes: dict[int, FoldOutcome] = {}
        for fold, child in previous.items():
            if child.info.status == "FINISHED":
                outcomes[fold] = FoldOutcome({"fold": fold, "run_id": child.info.run_id,
                                              **{m: child.data.metrics.get(m, np.nan) for m in CV_METRICS}},
                                             _history_of(child.info.run_id), None)
        todo = [fold for fold in range(k) if fold not in outcomes]
        jobs = [(fold, previous[fold].info.run_id if fold in previous else "") for fold in todo]
        distributed.share(todo)  # the folds DDP replicas train with rank 0
        with planned_fits(len(todo), "fold"):
            if parallel > 1 and len(todo) > 1:
                outcomes.update(_parallel_folds(cfg, parent.info.run_id, jobs, parallel, tracking_uri))
            else:
                for fold, child_id in jobs:
                    outcomes[fold] = train_fold(cfg, data, fold, parent.info.run_id, child_id)
        ordered = [outcomes[fold] for fold in range(k)]
        table = pd.DataFrame([o.row for o in ordered])
        _log_summary(table, [o.history for o in ordered], cfg)
        counts = [o.confusion for o in ordered if o.confusion is not None]
        if counts:
            log_confusion_matrix(sum(counts[1:], counts[0]), dataset.class_names, "test",
                                 "Test confusion matrix, all folds (row-normalised)")
    return table


def check_launch(cfg: dict[str, Any]) -> None:
    """What `--nproc N` checks before it starts the processes (`registry.BEFORE_LAUNCH`)."""
    check_parallel(cfg["folds_parallel"], str(cfg["device"]), cfg["nproc"])


def check_parallel(parallel: int, device: str, nproc: int = 1) -> None:
    """`folds_parallel`: at least 1, on CPU no more processes than usable cores, and not with DDP (`nproc` > 1)."""
    if parallel < 1:
        raise ConfigError(f"folds_parallel={parallel}: expected 1 (one fold after another) or more")
    if parallel > 1 and nproc > 1:
        raise ConfigError(f"folds_parallel={parallel} with nproc={nproc}: either several folds at once (one process "
                          "each) or each fold over several processes (DDP), not both; pass one of them as 1")
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    cores = len(os.sched_getaffinity(0))
    if parallel > 1 and not on_cuda and parallel > cores:
        raise ConfigError(f"folds_parallel={parallel}: this machine has {cores} CPU cores, and folds trained side by "
                          f"side on CPU each need one; pass --folds-parallel {cores} or fewer")


def train_fold(cfg: dict[str, Any], data: FoldData, fold: int, parent_id: str, child_id: str = "") -> FoldOutcome:
    """Train (or resume, `child_id`) fold `fold` as a child run of `parent_id`; the same in the parent's process
    and in a `folds_parallel` worker."""
    ckpt_tag = get_run(child_id, "resume_run_id").data.tags.get(tag.CHECKPOINT_DIR, "") if child_id else ""
    resume = bool(child_id) and ((bool(ckpt_tag) and (Path(ckpt_tag) / "last.pt").is_file())
                                 or fetch_checkpoints(child_id, cache_root(cfg) / "checkpoints" / child_id))
    with start_run(cfg["entry_point"], cfg, run_name=f"fold {fold} · {cfg['model']}", nested=True,
                   parent_run_id=parent_id, resume_run_id=child_id if resume else "",
                   tags={tag.FOLD: str(fold), tag.PARENT_RUN_ID: parent_id, tag.MODEL: cfg["model"]}) as fold_run:
        ckpt = cache_root(cfg) / "checkpoints" / fold_run.info.run_id
        set_tags({tag.CHECKPOINT_DIR: ckpt})
        if not resume:  # the fold's own data inputs, so its model's metrics name their dataset
            log_dataset(data.dataset, data.train_rows.table, "train")
            if data.test_rows is not None:
                log_dataset(data.dataset, data.test_rows.table, "test")
        model = fold_model(cfg, data, fold)
        test = ArrayData(data.test_rows.images, data.test_rows.labels) if data.test_rows is not None else None
        distributed.share((str(ckpt), resume))  # where DDP replicas resume this fold from
        trained = fit_and_log(cfg, model, data.dataset.class_names, data.augment.subset(data.folds[fold][0]),
                              data.val(fold), test, checkpoint_dir=ckpt, resume=resume, info_extra={"fold": fold})
    confusion = (confusion_counts(trained.test.labels, trained.test.preds, data.dataset.num_classes)
                 if trained.test is not None else None)
    return FoldOutcome({"fold": fold, "run_id": fold_run.info.run_id,
                        **{m: trained.finals.get(m, np.nan) for m in CV_METRICS}}, trained.history, confusion)


def fold_model(cfg: dict[str, Any], data: FoldData, fold: int) -> torch.nn.Module:
    """Fold `fold`'s initial model, its training randomness seeded (each fold's repeats: seed + fold)."""
    seed_everything(cfg["seed"] + fold)
    return build_model(cfg, data.dataset.num_classes, seed=cfg["seed"] + fold)


def fold_replica(cfg: dict[str, Any], dataset: Dataset) -> None:
    """A DDP replica of `run` (rank > 0): trains each fold rank 0 trains, in step with it (`train_fold`), resuming
    from the checkpoint folder rank 0 resumes from; rank 0 alone logs, tests and assembles the parent run."""
    data = FoldData.load(cfg, dataset)  # cached by rank 0: read, not decoded
    for fold in distributed.share(None):
        checkpoint_dir, resume = distributed.share(None)
        replica_fit(cfg, fold_model(cfg, data, fold), data.augment.subset(data.folds[fold][0]), data.val(fold),
                    Path(checkpoint_dir), resume=resume)


def _parallel_folds(cfg: dict[str, Any], parent_id: str, jobs: list[tuple[int, str]], parallel: int,
                    tracking_uri: str) -> dict[int, FoldOutcome]:
    """Train `jobs` (fold, child run to resume or "") in up to `parallel` worker processes (spawned: a fresh
    interpreter each, its torch threads a share of the cores; on several GPUs, fold i on cuda:i mod count)."""
    workers = min(parallel, len(jobs))
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(tracking_uri, threads)) as pool:
        futures = {fold: pool.submit(_fold_worker, dict(cfg), fold, parent_id, child_id) for fold, child_id in jobs}
        return {fold: future.result() for fold, future in futures.items()}


def _worker_init(tracking_uri: str, threads: int) -> None:
    os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run`'s run is the parent's, not a worker's
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the parent's store (`setup_tracking` reads it)
    torch.set_num_threads(threads)


def _fold_worker(values: dict[str, Any], fold: int, parent_id: str, child_id: str) -> FoldOutcome:
    """A `folds_parallel` worker: fold `fold` of the parent's config (`values`), on its own GPU when there are
    several."""
    cfg = load_config(values["entry_point"], {k: v for k, v in values.items() if k != "entry_point"})
    device = str(cfg["device"])
    if (device in ("cuda", "auto") and torch.cuda.is_available() and torch.cuda.device_count() > 1):
        cfg = cfg.replace(device=f"cuda:{fold % torch.cuda.device_count()}")
    dataset = limit_classes(resolve_dataset(cfg), cfg["max_classes"])
    return train_fold(cfg, FoldData.load(cfg, dataset), fold, parent_id, child_id)


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
