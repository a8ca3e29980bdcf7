"""Promote the best fine-tuned ResNet-50 and its RandomForest head to the model registry.

The best finished resnet50 `transfer` run of the experiment — by the VALIDATION accuracy of its LoggedModel
(`best_val_acc`, found with `search_logged_models`; ties: lower `best_val_loss`, then the earlier run), never test —
is registered as `model_name` (default carsml-resnet50), and
the best `features_rf` run built on it (`carsml.backbone_run_id`; best `rf_val_acc`) as `rf_model_name` (default
carsml-resnet50-rf). Both are image → label pyfunc models, served alike by `mlflow models serve`.

Alias `champion` moves to a new version only when it beats the current champion's validation accuracy (or with
`force`); each registered model is judged on its own validation metric. Registry stages are not used (deprecated).
Promoting the same runs again reuses their versions, so a second promote changes nothing. Every lookup happens
before anything is registered: a missing run or RF head leaves the registry untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Run  # mlflow: the type of the runs read through tracking.search

from carsml.errors import CarsmlError, ConfigError
from carsml.tracking import registry
from carsml.tracking import tags as tag
from carsml.tracking.registry import AliasDecision
from carsml.tracking.runs import log_metrics, set_tags, setup_tracking, start_run
from carsml.tracking.search import experiment_id, get_run, search_models, search_runs, tracking_uri

BACKBONE = "resnet50"
DESCRIPTIONS = {
    "net": "resnet50 fine-tuned on Stanford Cars (carsml `transfer`). Input: DataFrame column `image` of base64 "
           "JPEG/PNG bytes; output per row: label, class_id, score, top5_labels, top5_scores. Promoted by "
           "`carsml promote`; alias `champion` = best validation accuracy.",
    "rf": "resnet50 backbone + RandomForest head (carsml `features_rf`). Same input/output as carsml-resnet50. "
          "Promoted by `carsml promote`; alias `champion` = best validation accuracy of the forest.",
}


@dataclass(frozen=True)
class Promotion:
    """What `promote` registered and where `champion` points."""

    model_name: str
    version: str
    created: bool  # False: the run was already registered (same model URI)
    champion: AliasDecision
    rf_model_name: str
    rf_version: str
    rf_created: bool
    rf_champion: AliasDecision
    source_run_id: str
    rf_run_id: str


# ------------------------------------------------------------------------------------------------ lookups


def _metric(run: Run, key: str) -> float | None:
    value = run.data.metrics.get(key)
    return value if value is not None and math.isfinite(value) else None


def _is_backbone(model_tag: str) -> bool:
    """resnet50, or resnet50 with a pretrained tag (resnet50.a1_in1k) — not resnet50d or other variants."""
    return model_tag == BACKBONE or model_tag.startswith(f"{BACKBONE}.")


def best_backbone_run(experiment_id: str, experiment_name: str) -> Run:
    """The finished resnet50 `transfer` run whose LoggedModel has the best validation accuracy: the experiment's
    LoggedModels ranked by their `best_val_acc` (`search_logged_models`), each the selected model of its run."""
    models = search_models([experiment_id], f"tags.`{tag.ENTRY_POINT}` = 'transfer'", "best_val_acc")
    runs = {m.source_run_id: get_run(m.source_run_id, "source run") for m in models
            if _is_backbone(m.tags.get(tag.MODEL, "")) and m.source_run_id}
    candidates = [r for r in runs.values()
                  if r.info.status == "FINISHED" and r.data.tags.get(tag.MODEL_URI)
                  and _metric(r, "best_val_acc") is not None]
    if not candidates:
        raise CarsmlError(f"promote: experiment {experiment_name!r} (tracking URI {tracking_uri()}) has no "
                          f"finished {BACKBONE} `transfer` run with a logged model and best_val_acc; train one with "
                          f"`carsml transfer --model {BACKBONE}`")
    loss = {r.info.run_id: _metric(r, "best_val_loss") for r in candidates}
    return min(candidates, key=lambda r: (-_metric(r, "best_val_acc"), loss[r.info.run_id] or math.inf,
                                          r.info.start_time))


def best_rf_run(experiment_id: str, backbone: Run) -> Run:
    """The finished `features_rf` run on `backbone` with an image → label model and the best rf_val_acc."""
    backbone_id = backbone.info.run_id
    query = (f"tags.`{tag.ENTRY_POINT}` = 'features_rf' and tags.`{tag.BACKBONE_RUN_ID}` = '{backbone_id}' "
             f"and attributes.status = 'FINISHED'")
    candidates = [r for r in search_runs([experiment_id], query)
                  if r.data.tags.get(tag.RF_MODEL_URI) and _metric(r, "rf_val_acc") is not None]
    if not candidates:
        raise CarsmlError(f"promote: the best {BACKBONE} transfer run {backbone_id} ({backbone.info.run_name}, "
                          f"best_val_acc {_metric(backbone, 'best_val_acc'):.4f}) has no finished features_rf run "
                          f"with an rf_model (RandomForest head); fit one with `carsml features-rf --run-id "
                          f"{backbone_id}`. Nothing was registered.")
    return min(candidates, key=lambda r: (-_metric(r, "rf_val_acc"), r.info.start_time))


def _tags(run: Run, val_key: str, test_key: str, fallback: Run | None = None) -> dict[str, str]:
    """Version tags: source run, validation / test accuracy, data digest and class count."""
    def lookup(key: str) -> str | None:
        return run.data.tags.get(key) or (fallback.data.tags.get(key) if fallback is not None else None)

    out = {"source_run_id": run.info.run_id, "entry_point": run.data.tags.get(tag.ENTRY_POINT, ""),
           registry.SCORE_TAG: repr(_metric(run, val_key))}
    if _metric(run, test_key) is not None:
        out["test_acc"] = repr(_metric(run, test_key))
    for key, name in ((tag.DATA_DIGEST, "data_digest"), (tag.NUM_CLASSES, "num_classes"),
                      (tag.MODEL, "backbone")):
        if lookup(key):
            out[name] = lookup(key)
    return out


def _check_names(cfg: dict[str, Any]) -> tuple[str, str]:
    names = str(cfg["model_name"]).strip(), str(cfg["rf_model_name"]).strip()
    for key, name in zip(("model_name", "rf_model_name"), names, strict=True):
        if not name:
            raise ConfigError(f"{key}: expected a registered model name, got {cfg[key]!r}")
    if names[0] == names[1]:
        raise ConfigError(f"model_name and rf_model_name are both {names[0]!r}; the two models need their own names")
    return names


# -------------------------------------------------------------------------------------------------- entry


def run(cfg: dict[str, Any]) -> Promotion:
    """Register the best resnet50 transfer run and its RF head; move `champion` where they win (see module doc)."""
    setup_tracking()
    name, rf_name = _check_names(cfg)
    experiment = experiment_id(cfg["experiment_name"])
    if experiment is None:
        raise CarsmlError(f"promote: no MLflow experiment {cfg['experiment_name']!r} at tracking URI "
                          f"{tracking_uri()}; set experiment_name to the one holding the transfer runs")
    backbone = best_backbone_run(experiment, cfg["experiment_name"])
    head = best_rf_run(experiment, backbone)
    net_uri, rf_uri = backbone.data.tags[tag.MODEL_URI], head.data.tags[tag.RF_MODEL_URI]
    registry.check_logged_model(net_uri)
    registry.check_logged_model(rf_uri)
    tags = {tag.SOURCE_RUN_ID: backbone.info.run_id, tag.RF_RUN_ID: head.info.run_id}
    with start_run(cfg["entry_point"], cfg, run_name="promote", tags=tags):
        version, created = registry.register(name, net_uri, _tags(backbone, "best_val_acc", "test_acc"),
                                             DESCRIPTIONS["net"])
        rf_tags = {**_tags(head, "rf_val_acc", "rf_test_acc", fallback=backbone),
                   "backbone_run_id": backbone.info.run_id,
                   "backbone_model": name, "backbone_version": str(version.version), "head": "random_forest"}
        if head.data.tags.get(tag.RF_HEAD_URI):
            rf_tags["rf_head_uri"] = head.data.tags[tag.RF_HEAD_URI]
        rf_version, rf_created = registry.register(rf_name, rf_uri, rf_tags, DESCRIPTIONS["rf"])
        champion = registry.promote(name, version, force=cfg["force"])
        rf_champion = registry.promote(rf_name, rf_version, force=cfg["force"])
        result = Promotion(name, str(version.version), created, champion, rf_name, str(rf_version.version),
                           rf_created, rf_champion, backbone.info.run_id, head.info.run_id)
        _log(result, backbone, head)
    return result


def _log(result: Promotion, backbone: Run, head: Run) -> None:
    """Record the outcome on the promote run and print it."""
    set_tags({tag.MODEL_VERSION: result.version, tag.RF_MODEL_VERSION: result.rf_version,
                     tag.CHAMPION_MOVED: str(result.champion.moved).lower(),
                     tag.RF_CHAMPION_MOVED: str(result.rf_champion.moved).lower(),
                     tag.CHAMPION_REASON: result.champion.reason,
                     tag.RF_CHAMPION_REASON: result.rf_champion.reason})
    log_metrics({"val_acc": _metric(backbone, "best_val_acc"), "rf_val_acc": _metric(head, "rf_val_acc")})
    for model, version, created, decision in (
        (result.model_name, result.version, result.created, result.champion),
        (result.rf_model_name, result.rf_version, result.rf_created, result.rf_champion),
    ):
        state = "registered" if created else "already registered"
        alias = "champion -> this version" if decision.moved else "champion unchanged"
        print(f"{model} version {version} ({state}); {alias}: {decision.reason}")
