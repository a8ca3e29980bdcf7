"""Promote the best fine-tuned network of one family (`model`: resnet50, the study's, by default) and its RandomForest
head to the model registry.

The best finished `transfer` run of that architecture in the experiment — by VALIDATION accuracy, never test: a
selection run's LoggedModel's `best_val_acc` (found with `search_logged_models`), a refit's the `best_val_acc` of the
selection run that chose its epochs (a refit is the same recipe trained on every training image, so it wins the tie with
its own selection run); further ties: lower `best_val_loss`, then the earlier run — is registered as `model_name`
(default carsml-<model>), and the best `features_rf` run built on it (`carsml.backbone_run_id`; best `rf_val_acc`) as
`rf_model_name` (default carsml-<model>-rf). Both are image → label pyfunc models, served alike by
`mlflow models serve`.

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

DESCRIPTIONS = {
    "net": "{model} fine-tuned on Stanford Cars (carsml `transfer`). Input: DataFrame column `image` of base64 "
           "JPEG/PNG bytes; output per row: label, class_id, score, top5_labels, top5_scores. Promoted by "
           "`carsml promote`; alias `champion` = best validation accuracy.",
    "rf": "{model} backbone + RandomForest head (carsml `features_rf`). Same input/output as {name}. "
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


def _in_family(model_tag: str, family: str) -> bool:
    """`family` itself, or with a pretrained tag (resnet50.a1_in1k for resnet50) — not resnet50d or other variants."""
    return model_tag == family or model_tag.startswith(f"{family}.")


def _validation(run: Run) -> tuple[float, float] | None:
    """(best_val_acc, best_val_loss) that rank `run`: its own, or a refit's selection run's (None: not rankable)."""
    selection = run.data.tags.get(tag.SELECTION_RUN_ID)
    judged = get_run(selection, "selection run") if selection else run
    if judged.info.status != "FINISHED" or _metric(judged, "best_val_acc") is None:
        return None
    return _metric(judged, "best_val_acc"), _metric(judged, "best_val_loss") or math.inf


def best_backbone_run(experiment_id: str, experiment_name: str, family: str) -> Run:
    """The finished `transfer` run of architecture `family` with the best validation accuracy: the experiment's
    LoggedModels ranked by their `best_val_acc` (`search_logged_models`), each the selected model of its run, and the
    refits of those runs, each judged by its selection run's validation (and preferred to it on a tie)."""
    models = search_models([experiment_id], f"tags.`{tag.ENTRY_POINT}` = 'transfer'", "best_val_acc")
    ids = {m.source_run_id for m in models if _in_family(m.tags.get(tag.MODEL, ""), family) and m.source_run_id}
    query = f"tags.`{tag.ENTRY_POINT}` = 'transfer' and attributes.status = 'FINISHED'"
    ids |= {r.info.run_id for r in search_runs([experiment_id], query)
            if r.data.tags.get(tag.SELECTION_RUN_ID) and _in_family(r.data.tags.get(tag.MODEL, ""), family)}
    runs = [get_run(run_id, "source run") for run_id in sorted(ids)]
    scored = {r.info.run_id: _validation(r) for r in runs
              if r.info.status == "FINISHED" and r.data.tags.get(tag.MODEL_URI)}
    candidates = [r for r in runs if scored.get(r.info.run_id) is not None]
    if not candidates:
        raise CarsmlError(f"promote: experiment {experiment_name!r} (tracking URI {tracking_uri()}) has no "
                          f"finished {family} `transfer` run with a logged model and best_val_acc; train one with "
                          f"`carsml transfer --model {family}`")
    return min(candidates, key=lambda r: (-scored[r.info.run_id][0], not r.data.tags.get(tag.SELECTION_RUN_ID),
                                          scored[r.info.run_id][1], r.info.start_time))


def best_rf_run(experiment_id: str, backbone: Run) -> Run:
    """The finished `features_rf` run on `backbone` with an image → label model and the best rf_val_acc."""
    backbone_id = backbone.info.run_id
    query = (f"tags.`{tag.ENTRY_POINT}` = 'features_rf' and tags.`{tag.BACKBONE_RUN_ID}` = '{backbone_id}' "
             f"and attributes.status = 'FINISHED'")
    candidates = [r for r in search_runs([experiment_id], query)
                  if r.data.tags.get(tag.RF_MODEL_URI) and _metric(r, "rf_val_acc") is not None]
    if not candidates:
        score = _validation(backbone) or (math.nan, math.nan)
        raise CarsmlError(f"promote: the best {backbone.data.tags.get(tag.MODEL)} transfer run {backbone_id} "
                          f"({backbone.info.run_name}, validation accuracy {score[0]:.4f}) has no finished "
                          f"features_rf run "
                          f"with an rf_model (RandomForest head); fit one with `carsml features-rf --run-id "
                          f"{backbone_id}`. Nothing was registered.")
    return min(candidates, key=lambda r: (-_metric(r, "rf_val_acc"), r.info.start_time))


def _tags(run: Run, val_acc: float | None, test_key: str, fallback: Run | None = None) -> dict[str, str]:
    """Version tags: source run, validation / test accuracy, data digest and class count."""
    def lookup(key: str) -> str | None:
        return run.data.tags.get(key) or (fallback.data.tags.get(key) if fallback is not None else None)

    out = {"source_run_id": run.info.run_id, "entry_point": run.data.tags.get(tag.ENTRY_POINT, ""),
           registry.SCORE_TAG: repr(val_acc)}
    if run.data.tags.get(tag.SELECTION_RUN_ID):
        out["selection_run_id"] = run.data.tags[tag.SELECTION_RUN_ID]
    if _metric(run, test_key) is not None:
        out["test_acc"] = repr(_metric(run, test_key))
    for key, name in ((tag.DATA_DIGEST, "data_digest"), (tag.NUM_CLASSES, "num_classes"),
                      (tag.MODEL, "backbone")):
        if lookup(key):
            out[name] = lookup(key)
    return out


def registered_names(cfg: dict[str, Any]) -> tuple[str, str]:
    """(model_name, rf_model_name) of a promote config: as given (unset: carsml-<model> and carsml-<model>-rf); checked.
    """
    family = str(cfg["model"]).strip()
    if not family:
        raise ConfigError(f"model: expected the architecture to promote (e.g. resnet50), got {cfg['model']!r}")
    names = (str(cfg["model_name"] or f"carsml-{family}").strip(),
             str(cfg["rf_model_name"] or f"carsml-{family}-rf").strip())
    if names[0] == names[1]:
        raise ConfigError(f"model_name and rf_model_name are both {names[0]!r}; the two models need their own names")
    return names


# -------------------------------------------------------------------------------------------------- entry


def run(cfg: dict[str, Any]) -> Promotion:
    """Register the best transfer run of `model` and its RF head; move `champion` where they win (see module doc)."""
    setup_tracking()
    name, rf_name = registered_names(cfg)
    experiment = experiment_id(cfg["experiment_name"])
    if experiment is None:
        raise CarsmlError(f"promote: no MLflow experiment {cfg['experiment_name']!r} at tracking URI "
                          f"{tracking_uri()}; set experiment_name to the one holding the transfer runs")
    family = str(cfg["model"]).strip()
    backbone = best_backbone_run(experiment, cfg["experiment_name"], family)
    val_acc = (_validation(backbone) or (None,))[0]
    head = best_rf_run(experiment, backbone)
    net_uri, rf_uri = backbone.data.tags[tag.MODEL_URI], head.data.tags[tag.RF_MODEL_URI]
    registry.check_logged_model(net_uri)
    registry.check_logged_model(rf_uri)
    tags = {tag.SOURCE_RUN_ID: backbone.info.run_id, tag.RF_RUN_ID: head.info.run_id}
    with start_run(cfg["entry_point"], cfg, run_name="promote", tags=tags):
        version, created = registry.register(name, net_uri, _tags(backbone, val_acc, "test_acc"),
                                             DESCRIPTIONS["net"].format(model=family))
        rf_tags = {**_tags(head, _metric(head, "rf_val_acc"), "rf_test_acc", fallback=backbone),
                   "backbone_run_id": backbone.info.run_id,
                   "backbone_model": name, "backbone_version": str(version.version), "head": "random_forest"}
        if head.data.tags.get(tag.RF_HEAD_URI):
            rf_tags["rf_head_uri"] = head.data.tags[tag.RF_HEAD_URI]
        rf_version, rf_created = registry.register(rf_name, rf_uri, rf_tags,
                                                   DESCRIPTIONS["rf"].format(model=family, name=name))
        champion = registry.promote(name, version, force=cfg["force"])
        rf_champion = registry.promote(rf_name, rf_version, force=cfg["force"])
        result = Promotion(name, str(version.version), created, champion, rf_name, str(rf_version.version),
                           rf_created, rf_champion, backbone.info.run_id, head.info.run_id)
        _log(result, val_acc, head)
    return result


def _log(result: Promotion, val_acc: float | None, head: Run) -> None:
    """Record the outcome on the promote run and print it."""
    set_tags({tag.MODEL_VERSION: result.version, tag.RF_MODEL_VERSION: result.rf_version,
                     tag.CHAMPION_MOVED: str(result.champion.moved).lower(),
                     tag.RF_CHAMPION_MOVED: str(result.rf_champion.moved).lower(),
                     tag.CHAMPION_REASON: result.champion.reason,
                     tag.RF_CHAMPION_REASON: result.rf_champion.reason})
    log_metrics({"val_acc": val_acc, "rf_val_acc": _metric(head, "rf_val_acc")})
    for model, version, created, decision in (
        (result.model_name, result.version, result.created, result.champion),
        (result.rf_model_name, result.rf_version, result.rf_created, result.rf_champion),
    ):
        state = "registered" if created else "already registered"
        alias = "champion -> this version" if decision.moved else "champion unchanged"
        print(f"{model} version {version} ({state}); {alias}: {decision.reason}")
