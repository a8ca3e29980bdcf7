"""Study rows 2 and 5 — train one network (baseline_cnn, improved_cnn or a timm model) and evaluate it.

`fit_and_log` is the training body every experiment shares (single runs, k-fold children, transfer, tuning trials).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from sklearn.metrics import confusion_matrix

from carsml.config import load_config
from carsml.data.cache import DecodedImages, build_cache
from carsml.data.splits import membership_table, train_val_split
from carsml.data.table import Dataset
from carsml.data.transforms import build_transform
from carsml.engine.callbacks import Callback, RichProgress
from carsml.engine.device import seed_everything
from carsml.engine.evaluate import EvalResult, evaluate
from carsml.engine.loader import ArrayData
from carsml.engine.train import FitResult, TrainConfig, fit
from carsml.errors import CarsmlError, ConfigError, DataError
from carsml.experiments.common import cache_root, limit_classes, model_kwargs, resolve_dataset
from carsml.models.factory import count_parameters, create_model, model_config, resolve_data_config
from carsml.progress import progress_bar
from carsml.tracking import figures
from carsml.tracking.models import log_model
from carsml.tracking.runs import log_csv, log_dataset, log_figure, setup_tracking, start_run

TRAIN_KEYS = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "decay_norm_bias", "scheduler",
              "warmup_epochs", "plateau_factor", "plateau_patience", "label_smoothing", "ema_decay", "grad_clip",
              "early_stopping_patience", "select_on", "amp", "channels_last", "device", "seed", "head_lr",
              "freeze_backbone_epochs")


def train_config(cfg: dict[str, Any]) -> TrainConfig:
    """The engine config from an experiment config; validated (raises ConfigError before any run exists)."""
    kwargs = {k: cfg[k] for k in TRAIN_KEYS if k in cfg}
    if kwargs.get("head_lr", 0) <= 0:
        kwargs.pop("head_lr", None)
    tc = TrainConfig(**kwargs)
    tc.validate()
    if "augmentation" in cfg:  # unknown policies raise here, before any run exists
        build_transform(cfg["augmentation"], mixup=cfg.get("mixup", 0.0), cutmix=cfg.get("cutmix", 0.0))
    train_side(cfg)
    return tc


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


# The per-epoch test curves (reported, never selected on) get their own keys so that `test_acc` / `test_loss` hold one
# value each: the evaluation of the selected (best-validation) model.
EPOCH_KEYS = {"test_loss": "epoch_test_loss", "test_acc": "epoch_test_acc"}


def epoch_key(key: str) -> str:
    """The MLflow key of an engine history key."""
    return EPOCH_KEYS.get(key, key)


class MlflowMetrics(Callback):
    """Hands per-epoch metrics to one MLflow run (step = epoch); on resume, back-fills any epoch the run lacks so
    every step is logged exactly once."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.client = MlflowClient()

    def on_resume(self, history: list[dict]) -> None:
        for record in history:
            epoch = int(record["epoch"])
            for key, value in record.items():
                if key == "epoch":
                    continue
                steps = {m.step for m in self.client.get_metric_history(self.run_id, epoch_key(key))}
                if epoch not in steps:
                    self.client.log_metric(self.run_id, epoch_key(key), float(value), step=epoch)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({epoch_key(k): float(v) for k, v in metrics.items() if k != "epoch"}, step=epoch,
                           run_id=self.run_id)


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
    if decoded.skipped and mlflow.active_run():
        log_csv(pd.DataFrame(decoded.skipped, columns=["path", "reason"]), f"data/skipped_{split}.csv")
        mlflow.log_metric(f"{split}_images_skipped", len(decoded.skipped))
    return decoded


def info_for(model: Any, class_names: list[str], image_size: int, **extra: Any) -> dict[str, Any]:
    """The bundle info saved with a model: how to rebuild it and what its outputs mean."""
    data_cfg = resolve_data_config(model)
    return {"model_config": model_config(model), "class_names": list(class_names), "image_size": image_size,
            "mean": list(data_cfg["mean"]), "std": list(data_cfg["std"]), **extra}


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

    `val=None` is a refit: nothing is selected, the last epoch is the model and no val_* metric is logged."""
    run_id = mlflow.active_run().info.run_id
    tc = train_config(cfg)
    data_cfg = resolve_data_config(model)
    size = int(cfg["image_size"])
    train_tf = build_transform(cfg["augmentation"], size=size, mean=data_cfg["mean"], std=data_cfg["std"],
                               mixup=cfg.get("mixup", 0.0), cutmix=cfg.get("cutmix", 0.0))
    eval_tf = build_transform("none", size=size, mean=data_cfg["mean"], std=data_cfg["std"])
    n_params = count_parameters(model)
    mlflow.log_metric("n_params", n_params)
    result = fit(model, train, val, tc, train_transform=train_tf, eval_transform=eval_tf, test=test,
                 callbacks=(MlflowMetrics(run_id), RichProgress(), *callbacks),
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
    mlflow.log_metrics(finals)
    log_csv(history, "tables/history.csv")
    log_figure(figures.training_curves(history, title=f"{cfg['model']} — {cfg['entry_point']}"),
               "figures/curves.png")
    if test_result is not None:
        log_confusion(test_result, class_names, "test")
    model_uri = None
    if cfg.get("log_model", True):
        examples = np.asarray((test if test is not None else val if val is not None else train).images[:2])
        info = info_for(model, class_names, cfg["image_size"], source_run_id=run_id, **(info_extra or {}))
        model_uri = log_model(model.cpu(), info, examples)
    if checkpoint_dir is not None and not cfg.get("keep_checkpoints", False):
        # finished: the run holds the best model; checkpoints (GBs for large nets) only serve a resume
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return Trained(result, test_result, finals, history, model_uri)


def log_confusion(result: EvalResult, class_names: list[str], split: str) -> np.ndarray:
    """Row-normalised confusion matrix as a figure and CSV; per-image predictions as CSV."""
    n = len(class_names)
    counts = confusion_matrix(result.labels, result.preds, labels=np.arange(n))
    norm = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    log_figure(figures.confusion_matrix(norm, class_names, title=f"Confusion matrix ({split}, row-normalised)"),
               f"figures/confusion_matrix_{split}.png")
    log_csv(pd.DataFrame(counts, index=class_names, columns=class_names).reset_index(names="true\\predicted"),
            f"tables/confusion_matrix_{split}.csv")
    probs = result.probs
    log_csv(pd.DataFrame({"label": result.labels, "pred": result.preds,
                          "score": probs[np.arange(len(probs)), result.preds]}), f"tables/predictions_{split}.csv")
    return counts


def resume_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The original run's config and checkpoint folder for `resume_run_id` (checked before anything starts)."""
    run_id = cfg["resume_run_id"]
    try:
        run = MlflowClient().get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException or a connection error, both mean "cannot resume"
        raise CarsmlError(f"resume_run_id={run_id!r}: no such MLflow run ({exc})") from None
    if run.data.tags.get("carsml.entry_point") != cfg["entry_point"]:
        raise ConfigError(f"resume_run_id={run_id!r} is a {run.data.tags.get('carsml.entry_point')!r} run, "
                          f"not {cfg['entry_point']!r}")
    folder = Path(run.data.tags.get("carsml.checkpoint_dir", ""))
    if not (folder / "last.pt").is_file():
        raise CarsmlError(f"resume_run_id={run_id!r}: no checkpoint at {folder / 'last.pt'}")
    original = {k: v for k, v in run.data.params.items()}
    resumed = load_config(cfg["entry_point"], {**original, "resume_run_id": run_id})
    return resumed, folder


def refit_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of a refit: the finished selection run `refit_run_id`'s own options, trained on every training image
    (train + val) for the number of epochs that run selected on validation (its `best_epoch`). Checked before any work:
    the test split plays no part in the choice, and a refit is logged as its own run tagged with the selection run."""
    run_id = cfg["refit_run_id"]
    try:
        run = MlflowClient().get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException or a connection error, both mean "cannot refit"
        raise CarsmlError(f"refit_run_id={run_id!r}: no such MLflow run ({exc})") from None
    entry = run.data.tags.get("carsml.entry_point")
    if entry != cfg["entry_point"]:
        raise ConfigError(f"refit_run_id={run_id!r} is a {entry!r} run, not {cfg['entry_point']!r}; refit with "
                          f"`carsml {str(entry).replace('_', '-')} --refit-run-id {run_id}`")
    if run.data.params.get("refit_run_id"):
        raise ConfigError(f"refit_run_id={run_id!r} is itself a refit (of {run.data.params['refit_run_id']}); pass "
                          "the selection run")
    if run.info.status != "FINISHED" or "best_epoch" not in run.data.metrics:
        raise ConfigError(f"refit_run_id={run_id!r}: the selection run is {run.info.status} without a best epoch; a "
                          "refit needs a FINISHED selection run (resume it first with --resume-run-id)")
    refit = load_config(cfg["entry_point"], {**run.data.params, "refit_run_id": run_id,
                                             "resume_run_id": cfg["resume_run_id"],
                                             "epochs": int(run.data.metrics["best_epoch"])})
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
    run_id = mlflow.active_run().info.run_id
    if checkpoint_dir is None:
        checkpoint_dir = cache_root(cfg) / "checkpoints" / run_id
        mlflow.set_tag("carsml.checkpoint_dir", str(checkpoint_dir))
    if not resume:
        log_dataset(dataset, splits.train_rows.table, "train")
        if splits.test_rows is not None:
            log_dataset(dataset, splits.test_rows.table, "test")
        log_csv(membership_table(splits.train_rows.table["fname"], {"train": splits.train_idx, "val": splits.val_idx}),
                "data/split_membership.csv")
    val = splits.val if len(splits.val_idx) else None
    return fit_and_log(cfg, model, dataset.class_names, splits.train, val, splits.test,
                       checkpoint_dir=checkpoint_dir, resume=resume, info_extra=info_extra)


def build_model(cfg: dict[str, Any], num_classes: int, *, for_resume: bool = False) -> Any:
    """The configured network, seeded so its initial weights repeat (a resume restores them from the checkpoint)."""
    seed_everything(cfg["seed"])
    return create_model(cfg["model"], num_classes, cfg["image_size"], **model_kwargs(cfg))


def run(cfg: dict[str, Any], *, build: Callable[..., Any] = build_model,
        extra_tags: Callable[[dict[str, Any]], dict[str, str]] = lambda cfg: {}) -> Trained:
    """Train one network on a stratified train/val split of the official train set; report the official test split.

    `build(cfg, num_classes, for_resume=...)` makes the network and `extra_tags(cfg)` adds run tags (and model-bundle
    extras): the transfer entry point is this same function with its own model builder.
    """
    setup_tracking()
    checkpoint_dir = None
    if cfg["resume_run_id"]:
        cfg, checkpoint_dir = resume_config(cfg)
    refit_of = cfg.get("refit_run_id", "")
    if refit_of:
        cfg = refit_config(cfg)
    train_config(cfg)  # validate before any work
    dataset = limit_classes(resolve_dataset(cfg), cfg["max_classes"])
    model = build(cfg, dataset.num_classes, for_resume=checkpoint_dir is not None)
    tags = extra_tags(cfg)
    run_tags = {"carsml.model": cfg["model"], **tags, **({"carsml.selection_run_id": refit_of} if refit_of else {})}
    run_name = f"{cfg['entry_point']}-{cfg['model']}" + ("-refit" if refit_of else "")
    with start_run(cfg["entry_point"], cfg, run_name=run_name, resume_run_id=cfg["resume_run_id"], tags=run_tags):
        return train_in_run(cfg, dataset, model, load_splits(cfg, dataset), checkpoint_dir=checkpoint_dir,
                            resume=checkpoint_dir is not None,
                            info_extra={k.removeprefix("carsml."): v for k, v in tags.items()} or None)
