"""Study row 10 — fine-tune ImageNet-pretrained timm models with a new head (`transfer`), and all four of the
study's models as nested runs of one parent followed by the comparison table (`transfer_all`).

Both are compositions of the shared pieces: the model factory (pretrained weights from the Hugging Face cache or a
local `weights` file, fail-fast offline), `decode` / `train_val_split` for the data, and `fit_and_log` for the
training body, so a transfer run logs exactly what the CNN experiments log (per-epoch metrics with step=epoch,
finals, curves, confusion matrix, the best model). Normalisation follows the model's own timm data config.

Everything that can be wrong with the options (unknown model name, unreachable pretrained weights, a weights file
of another architecture, bad training options) raises before any run is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from carsml.config import load_config, options
from carsml.errors import ConfigError
from carsml.experiments import train
from carsml.experiments.common import build_model, limit_classes, resolve_dataset
from carsml.experiments.train import Trained, load_splits, train_config, train_in_run
from carsml.progress import planned_fits
from carsml.tracking import tags as tag
from carsml.tracking.runs import setup_tracking, start_run, use_experiment_of
from carsml.tracking.search import child_runs, config_from_run, get_run

STUDY_MODELS = ("resnet50", "vgg16", "densenet121", "efficientnet_b0")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# transfer_all options that are its own, not a child transfer run's
PARENT_ONLY = ("models", "resume_run_id")


def init_source(cfg: dict[str, Any]) -> str:
    """How the network starts: "pretrained", "weights:<file>" or "random" (tagged `carsml.init`)."""
    if cfg.get("weights"):
        return f"weights:{cfg['weights']}"
    return "pretrained" if cfg.get("pretrained") else "random"


def _run_tags(cfg: dict[str, Any]) -> dict[str, str]:
    return {tag.MODEL: cfg["model"], tag.INIT: init_source(cfg)}


def run(cfg: dict[str, Any]) -> Trained:
    """Fine-tune `model` (pretrained, from `weights`, or random) on a stratified train/val split; report test."""
    return train.run(cfg, extra_tags=lambda cfg: {tag.INIT: init_source(cfg)})


# --------------------------------------------------------------------------------------------- transfer_all


def parse_models(text: str) -> list[str]:
    """The comma-separated `models` option as a list (ConfigError when empty or with duplicates)."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    if not names:
        raise ConfigError(f"models: expected comma-separated model names (e.g. {','.join(STUDY_MODELS)}); "
                          f"got {text!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"models: {', '.join(duplicates)} listed more than once in {text!r}")
    return names


def weights_file(folder: str, model: str) -> str:
    """`<folder>/<model><suffix>` for transfer_all's `weights` folder (ConfigError naming what was looked for)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"weights: transfer_all expects a folder with one state dict per model; {root} is not a "
                          f"folder (use the transfer entry point for a single file)")
    for suffix in WEIGHT_SUFFIXES:
        if (root / f"{model}{suffix}").is_file():
            return str(root / f"{model}{suffix}")
    raise ConfigError(f"weights: no file for model {model!r} in {root}; expected one of "
                      f"{', '.join(model + s for s in WEIGHT_SUFFIXES)}")


def child_config(cfg: dict[str, Any], model: str) -> dict[str, Any]:
    """The full `transfer` config of one child: the parent's shared options with `model` (and its weights file)."""
    shared = {k: v for k, v in cfg.items() if k in options("transfer") and k not in ("model", "weights", *PARENT_ONLY)}
    weights = weights_file(cfg["weights"], model) if cfg["weights"] else None
    return load_config("transfer", {**shared, "model": model, "weights": weights})


def _parent_resume(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """For resume_run_id: the parent's original config and its finished children (model -> run id).

    Makes the parent's experiment the active one: nested runs are created in the active experiment, which in a
    fresh process (or under `mlflow run --experiment-name`) would otherwise not be the parent's."""
    run_id = cfg["resume_run_id"]
    parent = get_run(run_id, "resume_run_id")
    if parent.data.tags.get(tag.ENTRY_POINT) != "transfer_all":
        raise ConfigError(f"resume_run_id={run_id!r} is a {parent.data.tags.get('carsml.entry_point')!r} run, "
                          f"not 'transfer_all'")
    original = config_from_run(parent, {"resume_run_id": run_id})
    use_experiment_of(parent)
    children = child_runs(parent)
    finished = {r.data.tags[tag.MODEL]: r.info.run_id for r in children
                if r.info.status == "FINISHED" and tag.MODEL in r.data.tags}
    return original, finished


def run_all(cfg: dict[str, Any]) -> pd.DataFrame:
    """One parent run, one nested `transfer` child per model, then the comparison table logged to the parent."""
    from carsml.experiments import compare

    setup_tracking()
    finished: dict[str, str] = {}
    if cfg["resume_run_id"]:
        cfg, finished = _parent_resume(cfg)
    if cfg["model"]:
        raise ConfigError(f"model={cfg['model']!r}: transfer_all trains every name in `models` "
                          f"(now {cfg['models']!r}); leave model empty, or use models={cfg['model']}")
    names = parse_models(cfg["models"])
    children = {name: child_config(cfg, name) for name in names}
    for child in children.values():
        train_config(child)
    dataset = limit_classes(resolve_dataset(cfg), cfg["max_classes"])
    # Build every remaining model now: unknown names and unavailable weights fail before the parent run exists.
    models = {name: build_model(child, dataset.num_classes) for name, child in children.items() if name not in finished}
    with start_run(cfg["entry_point"], cfg, run_name="transfer_all", resume_run_id=cfg["resume_run_id"],
                   tags={tag.MODELS: ",".join(names)}) as parent:
        parent_id = parent.info.run_id
        splits = load_splits(cfg, dataset)
        with planned_fits(len(children) - len(finished), "model"):
            for name, child in children.items():
                if name in finished:
                    continue
                with start_run("transfer", child, run_name=f"transfer-{name}", nested=True,
                               tags={**_run_tags(child), tag.PARENT_RUN_ID: parent_id}):
                    train_in_run(child, dataset, models.pop(name), splits)
        table = compare.build_table(parent_run_id=parent_id)
        compare.log_table(table, parent_id)
    return table
