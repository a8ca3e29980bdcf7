"""Study row 9 — add a class (BIG_TRUCKS) from a folder of images and train a model with one more output.

The folder's images are split (seeded) into train / validation / test alongside the source model's data (same
validation fraction; `test_fraction` of them become the new class's test set, as it has no official one). Training
goes through the shared `fit_and_log` (curves, confusion matrix, logged model) either

* `mode=scratch` — the study: the source run's architecture and training settings, fresh weights; or
* `mode=warmstart` — the trained source model with its classifier grown by one row (old rows copied, the new one
  imprinted from the mean feature of the new class's training images, or the mean of the old rows), then a short
  fine-tune (fewer epochs, a tenth of the learning rate for everything but the classifier).

The run logs the new class's accuracy / precision / recall and confusions (both directions), and the old classes'
test accuracy against the source model's on the same images (`forgetting`). The logged model's class names end with
the new class, so serving reports it; its bundle records how to rebuild the extended data, so `errors` and `tta`
analyse it like any other model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from carsml.config import load_config
from carsml.data.splits import membership_table
from carsml.engine.device import resolve_device, seed_everything
from carsml.engine.evaluate import EvalResult, evaluate, predict
from carsml.engine.loader import ArrayData
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments.common import cache_root
from carsml.experiments.source import (
    BOX_FILE,
    DataPlan,
    NewClass,
    Source,
    decode_splits,
    eval_transform,
    load_source,
    plan_data,
    plan_new_class,
    require_split,
)
from carsml.models.factory import create_model
from carsml.tracking import tags as tag
from carsml.tracking.runs import log_csv, log_dataset, log_metrics, log_params, setup_tracking, start_run

WARMSTART_EPOCHS = 5  # the default fine-tune length (never more than the source run trained)
WARMSTART_LR_FACTOR = 0.1  # backbone lr = source lr x this; the classifier keeps the source lr


# ======================================================================================= the model


def last_linear(module: nn.Module) -> nn.Linear | None:
    """The classifier's final linear layer (the classifier itself, or its last Linear)."""
    if isinstance(module, nn.Linear):
        return module
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def check_growable(model: nn.Module, num_classes: int) -> None:
    """warmstart needs a linear classifier with one row per class."""
    layer = last_linear(model.get_classifier())
    if layer is None or layer.out_features != num_classes:
        raise ConfigError(f"mode=warmstart: cannot grow the classifier of {type(model).__name__} "
                          f"({type(model.get_classifier()).__name__}); use mode=scratch")


def grow_classifier(model: nn.Module, new_weight: torch.Tensor, new_bias: float) -> nn.Module:
    """Add one output: reset the classifier to n + 1 outputs, copy the n old rows, set the new row."""
    old = last_linear(model.get_classifier())
    weight = old.weight.detach().clone()
    bias = old.bias.detach().clone() if old.bias is not None else None
    n = weight.shape[0]
    model.reset_classifier(n + 1)
    fresh = last_linear(model.get_classifier())
    if fresh is None or tuple(fresh.weight.shape) != (n + 1, weight.shape[1]):
        raise CarsmlError(f"reset_classifier({n + 1}) on {type(model).__name__} did not give a {n + 1}-row linear "
                          f"classifier; use mode=scratch")
    with torch.no_grad():
        fresh.weight[:n] = weight
        fresh.weight[n] = new_weight.to(fresh.weight)
        if fresh.bias is not None:
            fresh.bias[:n] = bias if bias is not None else 0.0
            fresh.bias[n] = new_bias
    return model


def _mean_feature(model: nn.Module, data: ArrayData, info: dict[str, Any]) -> torch.Tensor:
    """Mean pre-logits feature of `data` (float32, the model where it is)."""
    features = predict(model, data, eval_transform(info), batch_size=64, amp="off", features=True).features
    return torch.from_numpy(features.mean(axis=0))


def warmstart_model(source: Source, new_train: ArrayData, init: str) -> nn.Module:
    """The source model with one more output: old rows kept, the new row imprinted or the mean of the old rows."""
    model = source.model.cpu().float()
    old = last_linear(model.get_classifier())
    weight = old.weight.detach()
    bias = float(old.bias.detach().mean()) if old.bias is not None else 0.0
    if init == "imprint":
        # weight imprinting: the new class's mean feature, scaled like an average old row
        feature = _mean_feature(model, new_train, source.info)
        row = feature / feature.norm().clamp_min(1e-12) * weight.norm(dim=1).mean()
    else:
        row = weight.mean(dim=0)
    return grow_classifier(model, row, bias)


def scratch_model(source: Source, num_classes: int, seed: int) -> nn.Module:
    """The source architecture with `num_classes` outputs and fresh weights (pretrained ones if the source was),
    initialised from `seed` so a rerun starts from the same weights."""
    config = {**source.info["model_config"], "num_classes": num_classes}
    if source.cfg.get("pretrained"):
        config["pretrained"] = True
    seed_everything(seed)  # and the training randomness after it
    return create_model(**config, seed=seed)


# ======================================================================================= training settings


def training_config(source: Source, cfg: dict[str, Any], mode: str) -> dict[str, Any]:
    """The config fit_and_log trains with: the source's training settings, then this run's choices."""
    base = load_config("baseline")  # every training key exists, even for a source that records fewer
    settings = {**base, **{k: v for k, v in source.cfg.items() if k in base}}
    settings["model"] = str(source.info["model_config"]["name"])
    source_lr = float(settings["lr"])
    warm = mode == "warmstart"
    def given(key: str, fallback: Any) -> Any:  # this run's option, None = the mode's default
        return fallback if cfg[key] is None else cfg[key]

    epochs = given("epochs", min(WARMSTART_EPOCHS, int(settings["epochs"])) if warm else int(settings["epochs"]))
    lr = given("lr", source_lr * WARMSTART_LR_FACTOR if warm else source_lr)
    head_lr = given("head_lr", source_lr if warm else source.cfg.get("head_lr"))
    settings.update(entry_point=cfg["entry_point"], epochs=epochs, lr=lr, head_lr=head_lr, device=cfg["device"],
                    batch_size=given("batch_size", int(settings["batch_size"])), log_model=True,
                    resume_run_id=None, seed=given("seed", int(settings["seed"])))
    if "freeze_backbone_epochs" in source.cfg:
        settings["freeze_backbone_epochs"] = source.cfg["freeze_backbone_epochs"]
    return settings


def _check_numbers(cfg: Mapping[str, Any]) -> None:
    for key in ("epochs", "lr", "head_lr", "batch_size"):
        if cfg[key] is not None and cfg[key] <= 0:
            raise ConfigError(f"Option {key!r}: expected a positive number, or empty for the mode's default; "
                              f"got {cfg[key]!r}")


# ======================================================================================= the entry point


@dataclass
class NewCategoryResult:
    """What new_category produced (also returned to Python callers)."""

    run_id: str
    model_uri: str | None
    class_names: list[str]
    metrics: dict[str, float]
    confusions: pd.DataFrame
    new_class: NewClass


def run(cfg: dict[str, Any]) -> NewCategoryResult:
    """Add the folder's class to the model `cfg["run_id"]` and train (from scratch or warm-started)."""
    from carsml.experiments.train import fit_and_log, train_config

    setup_tracking()
    mode, init = cfg["mode"], cfg["init"]  # choices checked by NewCategoryOptions
    _check_numbers(cfg)
    resolve_device(str(cfg["device"]))
    source = load_source(cfg["run_id"], cfg["experiment_name"])
    base = plan_data(source, cfg)
    require_split(base, "test")
    settings = training_config(source, cfg, mode)
    settings["image_size"] = int(base.cfg["image_size"])
    train_config(settings)  # validate before any run exists
    spec = {"class_name": cfg["class_name"], "folder": cfg["folder"], "test_fraction": cfg["test_fraction"],
            "seed": settings["seed"]}
    new = plan_new_class(spec, base.cfg, base.class_names)
    if mode == "warmstart":
        check_growable(source.model, len(base.class_names))
    plan = DataPlan(base.cfg, base.dataset, [*base.class_names, new.class_name], [*base.added, new])
    with start_run(cfg["entry_point"], cfg, run_name=f"new_category-{mode}-{new.class_name}",
                   tags={**source.tags(), tag.NEW_CLASS: new.class_name, tag.MODE: mode}) as active:
        log_params({"new_class_folder": str(new.folder),
                    "new_class_boxes": BOX_FILE if (new.folder / BOX_FILE).is_file() else "whole images",
                    "effective_epochs": settings["epochs"],
                           "effective_lr": settings["lr"], "effective_head_lr": settings["head_lr"],
                           "effective_batch_size": settings["batch_size"], "effective_seed": settings["seed"]})
        splits = decode_splits(plan)
        log_csv(membership_table(new.table["fname"], {r: np.flatnonzero(new.table["role"] == r)
                                                      for r in ("train", "val", "test")}), "data/new_class_split.csv")
        for role in ("train", "test"):
            log_dataset(base.dataset, splits.tables[role], role)
        old_label = len(base.class_names)
        source_result = _evaluate_old(source, splits.test, old_label, settings)
        new_train = splits.train.subset(np.flatnonzero(splits.train.targets == old_label))
        model = warmstart_model(source, new_train, init) if mode == "warmstart" else \
            scratch_model(source, len(plan.class_names), int(settings["seed"]))
        checkpoint_dir = cache_root(plan.cfg) / "checkpoints" / active.info.run_id
        info_extra = {"data_cfg": plan.cfg, "added_classes": [a.spec for a in plan.added],
                      "train_cfg": settings, "base_model_uri": source.model_uri, "mode": mode}
        trained = fit_and_log(settings, model, plan.class_names, splits.train, splits.val, splits.test,
                              checkpoint_dir=checkpoint_dir, info_extra=info_extra)
        metrics, confusions = new_class_metrics(trained.test, plan.class_names, source_result)
        metrics.update({f"new_class_{role}_images": float(new.count(role)) for role in ("train", "val", "test")})
        log_metrics(metrics)
        log_csv(confusions, "tables/new_class_confusions.csv", as_table=True)
        return NewCategoryResult(active.info.run_id, trained.model_uri, plan.class_names, metrics, confusions, new)


def _evaluate_old(source: Source, test: ArrayData, new_label: int, settings: dict[str, Any]) -> EvalResult:
    """The source model on the old classes' test images (the baseline for forgetting)."""
    old = test.subset(np.flatnonzero(test.targets < new_label))
    return evaluate(source.model, old, eval_transform(source.info), batch_size=int(settings["batch_size"]),
                    device=settings["device"], amp=settings["amp"], channels_last=bool(settings["channels_last"]))


def new_class_metrics(result: EvalResult, class_names: list[str],
                      source_old: EvalResult) -> tuple[dict[str, float], pd.DataFrame]:
    """New-class accuracy / precision / recall, old-class accuracy against the source's, and the new class's
    confusions in both directions (its images taken for old classes, old images taken for it)."""
    new = len(class_names) - 1
    labels, preds = result.labels, result.preds
    is_new, said_new = labels == new, preds == new
    hits = float((is_new & said_new).sum())
    recall = hits / max(is_new.sum(), 1)
    precision = hits / said_new.sum() if said_new.any() else 0.0
    old = ~is_new
    old_acc = float((preds[old] == labels[old]).mean())
    metrics = {"new_class_acc": recall, "new_class_recall": recall, "new_class_precision": precision,
               "new_class_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
               "new_class_false_negatives": float((is_new & ~said_new).sum()),
               "new_class_false_positives": float((old & said_new).sum()),
               "old_class_acc": old_acc, "old_class_acc_source": source_old.acc,
               "forgetting": source_old.acc - old_acc}
    rows = []
    for cls, count in zip(*np.unique(preds[is_new & ~said_new], return_counts=True), strict=True):
        rows.append({"direction": f"{class_names[new]} taken for", "class_id": int(cls),
                     "class_name": class_names[cls], "count": int(count)})
    for cls, count in zip(*np.unique(labels[old & said_new], return_counts=True), strict=True):
        rows.append({"direction": f"taken for {class_names[new]}", "class_id": int(cls),
                     "class_name": class_names[cls], "count": int(count)})
    table = pd.DataFrame(rows, columns=["direction", "class_id", "class_name", "count"])
    return metrics, table.sort_values(["direction", "count"], ascending=[True, False], kind="stable")
