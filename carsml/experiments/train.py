"""Study rows 2 and 5 — train one network (baseline_cnn, improved_cnn or a timm model) and evaluate it.

`fit_and_log` is the training body every experiment shares (single runs, k-fold children, transfer, tuning trials).
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Run  # mlflow: the type of the selection run a refit reads (through tracking.search)

from carsml.config import load_config, options
from carsml.data.cache import DecodedImages, build_cache
from carsml.data.splits import membership_table, train_val_split
from carsml.data.table import Dataset
from carsml.data.transforms import BatchTransform, build_transform
from carsml.engine import distributed
from carsml.engine.callbacks import Callback, RichProgress
from carsml.engine.device import resolve_device
from carsml.engine.evaluate import EvalResult, evaluate
from carsml.engine.loader import ArrayData
from carsml.engine.train import fit
from carsml.engine.types import FitResult, TrainConfig
from carsml.errors import CarsmlError, ConfigError, DataError
from carsml.experiments.analysis import confusion_counts
from carsml.experiments.common import build_model, cache_root, limit_classes, resolve_dataset
from carsml.models.factory import count_parameters, init_params, model_config, resolve_data_config
from carsml.progress import progress_bar
from carsml.tracking import figures
from carsml.tracking import tags as tag
from carsml.tracking.artifacts import log_confusion_matrix
from carsml.tracking.checkpoints import CheckpointArtifacts, drop_checkpoints, fetch_checkpoints, shares_checkpoints
from carsml.tracking.epochs import MlflowMetrics
from carsml.tracking.models import log_model, log_model_metrics
from carsml.tracking.runs import (
    active_run_id,
    describe,
    in_run,
    log_csv,
    log_dataset,
    log_figure,
    log_metrics,
    log_params,
    set_tags,
    setup_tracking,
    start_run,
)
from carsml.tracking.search import config_from_run, get_run, metric_history, run_artifact

TRAIN_KEYS = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "decay_norm_bias", "scheduler",
              "warmup_epochs", "plateau_factor", "plateau_patience", "label_smoothing", "ema_decay", "grad_clip",
              "early_stopping_patience", "select_on", "amp", "channels_last", "device", "seed", "head_lr",
              "freeze_backbone_epochs")


def train_config(cfg: dict[str, Any]) -> TrainConfig:
    """The engine config from an experiment config; validated (raises ConfigError before any run exists).

    A training option the config lacks (the saved config of a model trained by an older carsml) takes its default
    from `_train.yaml`, the one place training defaults are written."""
    defaults = options("_train")
    kwargs = {k: cfg[k] if k in cfg else defaults[k].default for k in TRAIN_KEYS if k in cfg or k in defaults}
    tc = TrainConfig(**kwargs)
    tc.validate()
    if "augmentation" in cfg:  # unknown policies raise here, before any run exists
        build_transform(cfg["augmentation"], mixup=cfg.get("mixup", 0.0), cutmix=cfg.get("cutmix", 0.0))
    train_side(cfg)
    return tc


def engine_config(**overrides: Any) -> TrainConfig:
    """The TrainConfig of the training entry points' defaults (`_train.yaml`) with `overrides` on top, for code that
    drives the engine directly (benchmarks, tests); not validated (`fit` validates it)."""
    return replace(train_config(load_config("baseline")), **overrides)


def train_side(cfg: dict[str, Any]) -> int:
    """Side of the cached images the training augmentation reads: `image_size` x `cache_scale`.

    A side larger than the model's input lets a random crop sample real pixels rather than upsample a small image;
    validation, test, analysis and serving always see the whole image at `image_size`.
    """
    scale, size = cfg.get("cache_scale", 1.0), int(cfg["image_size"])
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale >= 1.0 or scale > 8:
        shown = round(size * scale) if isinstance(scale, (int, float)) and math.isfinite(scale) else scale
        raise ConfigError(f"cache_scale={scale!r}: the training cache side ({shown} px) must be at least the "
                          f"training size image_size={size} px; expected a factor in [1, 8]")
    return max(size, round(size * scale))


@dataclass
class Trained:
    """What one training run produced."""

    fit: FitResult
    test: EvalResult | None
    finals: dict[str, float]
    history: pd.DataFrame
    model_uri: str | None


def decode(cfg: dict[str, Any], dataset: Dataset, split: str, side: int | None = None) -> DecodedImages | None:
    """Decoded crops of one official split at `side` px (default `image_size`; None when the dataset has no such
    split); skipped files are logged."""
    rows = dataset.split(split)
    if rows.empty:
        return None
    side = side or cfg["image_size"]
    with progress_bar(f"decoding {split} images" + (f" at {side} px" if side != cfg["image_size"] else "")) as update:
        decoded = build_cache(rows, side, cache_dir=cache_root(cfg), use_boxes=cfg["use_boxes"],
                              margin=cfg["crop_margin"], skip_unreadable=cfg["skip_unreadable"], progress=update)
    if side != cfg["image_size"]:
        return decoded  # the same rows as the image_size cache, whose skipped files are logged
    if decoded.skipped and in_run():
        log_csv(pd.DataFrame(decoded.skipped, columns=["path", "reason"]), f"data/skipped_{split}.csv")
        log_metrics({f"{split}_images_skipped": len(decoded.skipped)})
    return decoded


def info_for(model: Any, class_names: list[str], image_size: int, **extra: Any) -> dict[str, Any]:
    """The bundle info saved with a model: how to rebuild it and what its outputs mean."""
    data_cfg = resolve_data_config(model)
    return {"model_config": model_config(model), "class_names": list(class_names), "image_size": image_size,
            "mean": list(data_cfg["mean"]), "std": list(data_cfg["std"]), **extra}


def transforms_for(cfg: dict[str, Any], model: Any) -> tuple[BatchTransform, BatchTransform]:
    """(train, eval) batch transforms of `cfg` at `image_size`, with the model's normalisation."""
    data_cfg = resolve_data_config(model)
    size = int(cfg["image_size"])
    train_tf = build_transform(cfg["augmentation"], size=size, mean=data_cfg["mean"], std=data_cfg["std"],
                               mixup=cfg.get("mixup", 0.0), cutmix=cfg.get("cutmix", 0.0))
    return train_tf, build_transform("none", size=size, mean=data_cfg["mean"], std=data_cfg["std"])


# Metrics of the selected model, by the dataset input they were measured on (validation: the held-out part of train).
MODEL_METRICS = {"train": ("best_val_acc", "best_val_loss"),
                 "test": ("test_acc", "test_loss", "test_top5", "test_macro_f1", "test_correct", "test_errors")}


def fit_and_log(
    cfg: dict[str, Any],
    model: Any,
    class_names: list[str],
    train: ArrayData,
    val: ArrayData | None,
    test: ArrayData | None,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    callbacks: tuple[Callback, ...] = (),
    info_extra: dict[str, Any] | None = None,
) -> Trained:
    """Train with the shared engine inside the active run; log curves, finals, confusion matrix and the best model.

    `val=None` is a refit: nothing is selected, the last epoch is the model and no val_* metric is logged. A refit's
    test split is evaluated once, after training: with no validation curve, a per-epoch test curve would be the only
    curve of held-out data, an invitation to choose an epoch by the test split (and it costs a pass per epoch)."""
    run_id = active_run_id()
    tc = train_config(cfg)
    train_tf, eval_tf = transforms_for(cfg, model)
    n_params = count_parameters(model)
    shared = (CheckpointArtifacts(run_id, checkpoint_dir),) if checkpoint_dir and shares_checkpoints() else ()
    result = fit(model, train, val, tc, train_transform=train_tf, eval_transform=eval_tf,
                 test=test if val is not None else None,
                 callbacks=(*shared, MlflowMetrics(run_id), RichProgress(), *callbacks),
                 checkpoint_dir=checkpoint_dir, resume=resume)
    model.load_state_dict(result.best_state_dict)
    history = pd.DataFrame(result.history)
    finals = {"best_epoch": float(result.best_epoch), "n_params": float(n_params),
              "train_seconds": result.train_seconds, "epochs_run": float(result.epochs_run)}
    if val is not None:
        finals.update(best_val_acc=result.best_val_acc, best_val_loss=result.best_val_loss)
    test_result = None
    if test is not None:
        test_result = evaluate(model, test, eval_tf, batch_size=tc.eval_batch_size or tc.batch_size,
                               device=tc.device, amp=tc.amp, channels_last=tc.channels_last)
        finals.update({"test_acc": test_result.acc, "test_loss": test_result.loss, "test_top5": test_result.top5,
                       "test_macro_f1": test_result.macro_f1,
                       "test_correct": float((test_result.preds == test_result.labels).sum()),
                       "test_errors": float((test_result.preds != test_result.labels).sum())})
    # the selected model's validation and test results belong to the logged model: logged with it (below)
    of_model = {ctx: {k: finals[k] for k in keys if k in finals} for ctx, keys in MODEL_METRICS.items()}
    log_metrics({k: v for k, v in finals.items() if not any(k in m for m in of_model.values())})
    log_csv(history, "tables/history.csv")
    log_figure(figures.training_curves(history, title=f"{cfg['model']} — {cfg['entry_point']}"),
               "figures/curves.png")
    if test_result is not None:
        log_confusion(test_result, class_names, "test")
    model_uri = None
    if cfg.get("log_model", True):
        examples = np.asarray((test if test is not None else val if val is not None else train).images[:2])
        # the box policy travels with the model: serving crops a request's box as training cropped the dataset's
        info = info_for(model, class_names, cfg["image_size"], source_run_id=run_id, use_boxes=bool(cfg["use_boxes"]),
                        crop_margin=float(cfg["crop_margin"]), **(info_extra or {}))
        model_uri = log_model(model.cpu(), info, examples)
    for context, metrics in of_model.items():
        if metrics and model_uri:
            log_model_metrics(model_uri, metrics, context)
        elif metrics:
            log_metrics(metrics)
    describe(f"{cfg['model']} · {cfg['entry_point']} · " + " · ".join(
        f"{name} {finals[key]:.4f}" for name, key in (("val acc", "best_val_acc"), ("test acc", "test_acc"))
        if key in finals) + f" · epoch {result.best_epoch} of {result.epochs_run} selected")
    if checkpoint_dir is not None and not cfg.get("keep_checkpoints", False):
        # finished: the run holds the best model; checkpoints (GBs for large nets) only serve a resume
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        drop_checkpoints(run_id)
    return Trained(result, test_result, finals, history, model_uri)


def log_confusion(result: EvalResult, class_names: list[str], split: str) -> np.ndarray:
    """Confusion matrix (figure, row-normalised, and CSV of counts) and per-image predictions as CSV."""
    counts = confusion_counts(result.labels, result.preds, len(class_names))
    log_confusion_matrix(counts, class_names, split, f"Confusion matrix ({split}, row-normalised)")
    probs = result.probs
    log_csv(pd.DataFrame({"label": result.labels, "pred": result.preds,
                          "score": probs[np.arange(len(probs)), result.preds]}), f"tables/predictions_{split}.csv")
    return counts


def resume_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The original run's config and checkpoint folder for `resume_run_id` (checked before anything starts)."""
    run_id = cfg["resume_run_id"]
    run = get_run(run_id, "resume_run_id")
    if run.data.tags.get(tag.ENTRY_POINT) != cfg["entry_point"]:
        raise ConfigError(f"resume_run_id={run_id!r} is a {run.data.tags.get(tag.ENTRY_POINT)!r} run, "
                          f"not {cfg['entry_point']!r}")
    resumed = config_from_run(run, {"resume_run_id": run_id})
    folder = Path(run.data.tags.get(tag.CHECKPOINT_DIR, ""))
    if not (folder / "last.pt").is_file():  # another machine's cache: the run's checkpoint artifacts, if any
        folder = cache_root(resumed) / "checkpoints" / run_id
        if not fetch_checkpoints(run_id, folder):
            raise CarsmlError(f"resume_run_id={run_id!r}: no checkpoint at {run.data.tags.get(tag.CHECKPOINT_DIR)}"
                              f"/last.pt nor among the run's artifacts (with a tracking server every epoch's "
                              f"checkpoint is logged there: docs/tracking.md)")
    return resumed, folder


def refit_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of a refit: the finished selection run `refit_run_id`'s own options, trained on every training image
    (train + val) for the number of epochs that run selected on validation (its `best_epoch`). Checked before any work:
    the test split plays no part in the choice, and a refit is logged as its own run tagged with the selection run."""
    run_id = cfg["refit_run_id"]
    run = get_run(run_id, "refit_run_id")
    entry = run.data.tags.get(tag.ENTRY_POINT)
    if entry != cfg["entry_point"]:
        raise ConfigError(f"refit_run_id={run_id!r} is a {entry!r} run, not {cfg['entry_point']!r}; refit with "
                          f"`carsml {str(entry).replace('_', '-')} --refit-run-id {run_id}`")
    if run.data.params.get("refit_run_id"):
        raise ConfigError(f"refit_run_id={run_id!r} is itself a refit (of {run.data.params['refit_run_id']}); pass "
                          "the selection run")
    if run.info.status != "FINISHED" or "best_epoch" not in run.data.metrics:
        raise ConfigError(f"refit_run_id={run_id!r}: the selection run is {run.info.status} without a best epoch; a "
                          "refit needs a FINISHED selection run (resume it first with --resume-run-id)")
    refit = config_from_run(run, {"refit_run_id": run_id, "resume_run_id": cfg["resume_run_id"],
                                  "epochs": refit_epochs(run)})
    if refit["scheduler"] == "plateau" or refit["early_stopping_patience"] > 0:
        raise ConfigError(f"refit_run_id={run_id!r}: a refit has no validation split to drive "
                          f"scheduler={refit['scheduler']!r} / early_stopping_patience="
                          f"{refit['early_stopping_patience']}; select with scheduler cosine or none and no early "
                          "stopping (e.g. recipe=carsml), then refit")
    if refit["scheduler"] == "cosine" and refit.get("warmup_epochs", 0) >= refit["epochs"]:
        raise ConfigError(f"refit_run_id={run_id!r}: the selection run's best epoch ({refit['epochs']}) lies inside "
                          f"its {refit['warmup_epochs']}-epoch warm-up, so there is no budget to refit with; train "
                          "the selection run longer or with fewer warmup_epochs")
    return refit


def refit_epochs(run: Run) -> int:
    """The epochs a refit of selection run `run` trains: its best epoch, or with `select_on=val_acc` the last epoch
    whose validation accuracy, averaged with its neighbours' (`smoothed`), lies within one standard error of the best
    such average (`within_noise`).

    The validation split cannot tell such epochs apart, and of them the last is the one the run's schedule was written
    for (a cosine ends there): a refit for fewer epochs compresses the whole schedule into them. Measured on the real
    dev set (docs/study.md): a refit for the 24 or 25 epochs an argmax chose, instead of the 30 within noise of it, lost
    4.3 points of test accuracy on 20 classes and 4.9 on 60. The average keeps one lucky epoch (a spike of a few
    images) from raising the band above every later epoch."""
    best_epoch = int(run.data.metrics["best_epoch"])
    if run.data.params.get("select_on") != "val_acc":
        return best_epoch
    curve = dict(metric_history(run.info.run_id, "val_acc"))
    raw = run_artifact(run.info.run_id, "data/split_membership.csv")
    if not curve or raw is None:
        return best_epoch
    n_val = int((pd.read_csv(io.BytesIO(raw))["role"] == "val").sum())
    return max(best_epoch, within_noise(smoothed(curve), n_val))


def smoothed(curve: dict[int, float]) -> dict[int, float]:
    """Each epoch's value averaged with its neighbours' (the epochs before and after it, where they exist)."""
    epochs = sorted(curve)
    return {e: float(np.mean([curve[n] for n in epochs[max(i - 1, 0):i + 2]])) for i, e in enumerate(epochs)}


def within_noise(val_acc: dict[int, float], n_val: int) -> int:
    """The last epoch whose validation accuracy is within one standard error, sqrt(p (1 - p) / n_val), of the best p."""
    best = max(val_acc.values())
    margin = math.sqrt(best * (1 - best) / max(n_val, 1))
    return max(epoch for epoch, acc in val_acc.items() if acc >= best - margin)


@dataclass
class Splits:
    """The decoded official splits and the stratified train/val split of the official train set."""

    train_rows: DecodedImages  # at image_size: validation (and the rows' table)
    test_rows: DecodedImages | None
    train_idx: np.ndarray  # positions in train_rows
    val_idx: np.ndarray
    augment_rows: DecodedImages  # the same rows at train_side(cfg): what the training augmentation reads

    @property
    def train(self) -> ArrayData:
        return ArrayData(self.augment_rows.images, self.augment_rows.labels).subset(self.train_idx)

    @property
    def val(self) -> ArrayData:
        return ArrayData(self.train_rows.images, self.train_rows.labels).subset(self.val_idx)

    @property
    def test(self) -> ArrayData | None:
        rows = self.test_rows
        return ArrayData(rows.images, rows.labels) if rows is not None else None


def load_splits(cfg: dict[str, Any], dataset: Dataset) -> Splits:
    """Decode the official splits (cached) and split train into train/val with the config's seed and fraction."""
    train_rows = decode(cfg, dataset, "train")
    if train_rows is None:
        raise DataError(f"dataset {dataset.root}: no images in the official train split; transfer needs them")
    train_idx, val_idx = train_val_split(train_rows.labels, cfg["val_fraction"], cfg["seed"])
    test_rows = decode(cfg, dataset, "test")
    if cfg.get("refit_run_id"):  # every training image trains; nothing is held out (the selection run chose)
        train_idx, val_idx = np.arange(len(train_rows.labels)), np.arange(0)
    return Splits(train_rows, test_rows, train_idx, val_idx, augment_images(cfg, dataset, train_rows))


def augment_images(cfg: dict[str, Any], dataset: Dataset, train_rows: DecodedImages) -> DecodedImages:
    """The official train split as the training augmentation reads it: `train_rows` itself, or the same rows cached at
    `train_side(cfg)` when `cache_scale` > 1."""
    side = train_side(cfg)
    if side == cfg["image_size"]:
        return train_rows
    larger = decode(cfg, dataset, "train", side)
    if not larger.table["path"].equals(train_rows.table["path"]):  # pragma: no cover - same files, same decoder
        raise DataError(f"the train split cached at {side} px holds other images than at {cfg['image_size']} px")
    return larger


def train_in_run(cfg: dict[str, Any], dataset: Dataset, model: Any, splits: Splits, *,
                 checkpoint_dir: Path | None = None, resume: bool = False,
                 info_extra: dict[str, Any] | None = None) -> Trained:
    """Inside the active run: record the data and split, then train and log with `fit_and_log`."""
    run_id = active_run_id()
    if checkpoint_dir is None:
        checkpoint_dir = cache_root(cfg) / "checkpoints" / run_id
    set_tags({tag.CHECKPOINT_DIR: checkpoint_dir})  # a resume on another machine moves them
    if not resume:
        log_params(init_params(model))
        log_dataset(dataset, splits.train_rows.table, "train")
        if splits.test_rows is not None:
            log_dataset(dataset, splits.test_rows.table, "test")
        log_csv(membership_table(splits.train_rows.table["fname"], {"train": splits.train_idx, "val": splits.val_idx}),
                "data/split_membership.csv")
    val = splits.val if len(splits.val_idx) else None
    return fit_and_log(cfg, model, dataset.class_names, splits.train, val, splits.test,
                       checkpoint_dir=checkpoint_dir, resume=resume, info_extra=info_extra)


def run(cfg: dict[str, Any], *,
        extra_tags: Callable[[dict[str, Any]], dict[str, str]] = lambda cfg: {}) -> Trained:
    """Train one network on a stratified train/val split of the official train set; report the official test split.

    `extra_tags(cfg)` adds run tags (and model-bundle extras): the transfer entry point is this same function with
    its own tags (where the initial weights came from).

    Under torchrun (`nproc` > 1) every process runs this: rank 0 as above, the others as DDP replicas that train
    the same model without MLflow (`replica`), after rank 0 has decoded the cache and fetched any checkpoint.
    Returns None in a replica.
    """
    setup_tracking()
    here = join_processes(cfg)
    checkpoint_dir = None
    if cfg["resume_run_id"]:
        cfg, checkpoint_dir = resume_config(cfg)
    refit_of = cfg.get("refit_run_id", "")
    if refit_of:
        cfg = refit_config(cfg)
    train_config(cfg)  # validate before any work
    dataset = limit_classes(resolve_dataset(cfg), cfg["max_classes"])
    model = build_model(cfg, dataset.num_classes, for_resume=checkpoint_dir is not None)
    if not here.main:
        return replica(cfg, dataset, model, checkpoint_dir)
    tags = extra_tags(cfg)
    run_tags = {tag.MODEL: cfg["model"], **tags, **({tag.SELECTION_RUN_ID: refit_of} if refit_of else {}),
                **({tag.WORLD_SIZE: str(here.size)} if here.distributed else {})}
    run_name = f"{cfg['entry_point']}-{cfg['model']}" + ("-refit" if refit_of else "")
    with start_run(cfg["entry_point"], cfg, run_name=run_name, resume_run_id=cfg["resume_run_id"], tags=run_tags):
        splits = load_splits(cfg, dataset)
        distributed.barrier()  # the replicas wait here for the cache and checkpoints
        return train_in_run(cfg, dataset, model, splits, checkpoint_dir=checkpoint_dir,
                            resume=checkpoint_dir is not None,
                            info_extra={k.removeprefix(tag.PREFIX): v for k, v in tags.items()} or None)


def join_processes(cfg: dict[str, Any]) -> distributed.World:
    """This process's place under torchrun (one process: nothing to do). Every process checks the options first, so a
    bad one fails them all before any waits for another; then it joins the process group, and a replica (rank > 0)
    waits until rank 0 has decoded the cache (and fetched any checkpoint) it will read: rank 0 calls
    `distributed.barrier()` once it has."""
    here = distributed.world()
    if here.distributed:
        train_config(cfg)
        distributed.init(resolve_device(distributed.device_for(cfg["device"], here)))
        if not here.main:
            distributed.barrier()
    return here


def replica(cfg: dict[str, Any], dataset: Dataset, model: Any, checkpoint_dir: Path | None) -> None:
    """A DDP replica of `run` (rank > 0): the same `fit` as rank 0's on the same splits."""
    splits = load_splits(cfg, dataset)  # cached by rank 0: read, not decoded
    replica_fit(cfg, model, splits.train, splits.val if len(splits.val_idx) else None, checkpoint_dir)


def replica_fit(cfg: dict[str, Any], model: Any, train: ArrayData, val: ArrayData | None,
                checkpoint_dir: Path | None = None, *, resume: bool | None = None) -> None:
    """A DDP replica's part of one fit (rank > 0), in step with rank 0's `fit_and_log`: no MLflow, no checkpoints of
    its own (it resumes from rank 0's, `resume` defaulting to whether there is a `checkpoint_dir`), no test set
    (rank 0 reports it). Returns when rank 0 stops the fit early (a pruned trial)."""
    train_tf, eval_tf = transforms_for(cfg, model)
    with contextlib.suppress(distributed.Stopped):
        fit(model, train, val, train_config(cfg), train_transform=train_tf, eval_transform=eval_tf,
            checkpoint_dir=checkpoint_dir, resume=checkpoint_dir is not None if resume is None else resume)
