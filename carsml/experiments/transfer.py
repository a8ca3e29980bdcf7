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

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from torch import nn

from carsml.config import load_config, options
from carsml.engine.device import seed_everything
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments import train
from carsml.experiments.common import limit_classes, model_kwargs, resolve_dataset
from carsml.experiments.train import Trained, load_splits, train_config, train_in_run
from carsml.models.factory import create_model
from carsml.progress import planned_fits
from carsml.tracking.runs import setup_tracking, start_run

STUDY_MODELS = ("resnet50", "vgg16", "densenet121", "efficientnet_b0")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# transfer_all options that are its own, not a child transfer run's
PARENT_ONLY = ("models", "resume_run_id")


def init_source(cfg: dict[str, Any]) -> str:
    """How the network starts: "pretrained", "weights:<file>" or "random" (tagged `carsml.init`)."""
    if cfg.get("weights"):
        return f"weights:{cfg['weights']}"
    return "pretrained" if cfg.get("pretrained") else "random"


def build_model(cfg: dict[str, Any], num_classes: int, *, for_resume: bool = False) -> nn.Module:
    """The configured network with a `num_classes`-way head; seeded so the new head's initialisation repeats.

    A local `weights` file takes precedence over `pretrained` (whose default is true), so the offline remedy is one
    option; `carsml.init` records what was used. A resumed run restores every tensor from its checkpoint, so it
    neither needs nor asks for the weights.
    """
    kwargs = model_kwargs(cfg)
    if cfg.get("weights"):
        kwargs.pop("pretrained", None)
    if for_resume:
        kwargs.pop("pretrained", None)
        kwargs.pop("weights", None)
    seed_everything(cfg["seed"])
    return create_model(cfg["model"], num_classes, cfg["image_size"], **kwargs)


def _run_tags(cfg: dict[str, Any]) -> dict[str, str]:
    return {"carsml.model": cfg["model"], "carsml.init": init_source(cfg)}


def run(cfg: dict[str, Any]) -> Trained:
    """Fine-tune `model` (pretrained, from `weights`, or random) on a stratified train/val split; report test."""
    return train.run(cfg, build=build_model, extra_tags=lambda cfg: {"carsml.init": init_source(cfg)})


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
    weights = weights_file(cfg["weights"], model) if cfg["weights"] else ""
    return load_config("transfer", {**shared, "model": model, "weights": weights})


def _parent_resume(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """For resume_run_id: the parent's original config and its finished children (model -> run id).

    Makes the parent's experiment the active one: nested runs are created in the active experiment, which in a
    fresh process (or under `mlflow run --experiment-name`) would otherwise not be the parent's."""
    run_id = cfg["resume_run_id"]
    client = MlflowClient()
    try:
        parent = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException or a connection error, both mean "cannot resume"
        raise CarsmlError(f"resume_run_id={run_id!r}: no such MLflow run ({exc})") from None
    if parent.data.tags.get("carsml.entry_point") != "transfer_all":
        raise ConfigError(f"resume_run_id={run_id!r} is a {parent.data.tags.get('carsml.entry_point')!r} run, "
                          f"not 'transfer_all'")
    original = load_config("transfer_all", {**parent.data.params, "resume_run_id": run_id})
    mlflow.set_experiment(experiment_id=parent.info.experiment_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    finished = {r.data.tags["carsml.model"]: r.info.run_id for r in children
                if r.info.status == "FINISHED" and "carsml.model" in r.data.tags}
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
                   tags={"carsml.models": ",".join(names)}) as parent:
        parent_id = parent.info.run_id
        splits = load_splits(cfg, dataset)
        with planned_fits(len(children) - len(finished), "model"):
            for name, child in children.items():
                if name in finished:
                    continue
                with start_run("transfer", child, run_name=f"transfer-{name}", nested=True,
                               tags={**_run_tags(child), "carsml.parent_run_id": parent_id}):
                    train_in_run(child, dataset, models.pop(name), splits)
        table = compare.build_table(parent_run_id=parent_id)
        compare.log_table(table, parent_id)
    return table
