"""Logging and loading carsml models.

A trained network is saved as a *bundle* — `weights.pt` (state dict) and `model.json` (the factory config that rebuilds
the architecture, class names, input size and normalisation, the box policy its images were cropped with, extras such
as an added class) — and logged as an MLflow pyfunc LoggedModel (models-from-code, `pyfunc_model.py`) that carries the
bundle. Later experiments load models by run id or `models:/` URI, never by a loose file path; `mlflow models serve`
serves the same thing.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType, Array
from PIL import Image

from carsml.errors import CarsmlError
from carsml.tracking import tags as tag

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
BUNDLE = "bundle"


class BoxPolicy(NamedTuple):
    """How a model's images were cropped (the data settings `use_boxes` / `crop_margin`): to the annotated box grown
    by `margin` of its size per side, or whole."""

    use_boxes: bool = True
    margin: float = 0.0


def box_policy(info: dict[str, Any]) -> BoxPolicy:
    """The box policy recorded in a bundle's info (`use_boxes`, `crop_margin`); a bundle that records none gets the
    training defaults (boxes, no margin). ValueError for values no training run can have."""
    default = BoxPolicy()
    use_boxes, margin = info.get("use_boxes", default.use_boxes), info.get("crop_margin", default.margin)
    if not isinstance(use_boxes, bool):
        raise ValueError(f"bundle info: use_boxes={use_boxes!r}; expected true or false")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"bundle info: crop_margin={margin!r}; expected a fraction >= 0 of the box size")
    return BoxPolicy(use_boxes, float(margin))


def save_bundle(model: torch.nn.Module, info: dict[str, Any], directory: Path) -> Path:
    """Write weights.pt + model.json into `directory` (created); `info` needs model_config, class_names, image_size,
    mean and std, and may hold the box policy (`use_boxes`, `crop_margin`: see `box_policy`)."""
    missing = {"model_config", "class_names", "image_size", "mean", "std"} - set(info)
    if missing:
        raise ValueError(f"bundle info lacks {sorted(missing)}")
    box_policy(info)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / "weights.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / "weights.pt")
    (directory / "model.json").write_text(json.dumps(info, indent=2))
    return directory


def load_bundle(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a bundle folder (eval mode, CPU) and return it with its info."""
    from carsml.models.factory import create_model

    directory = Path(directory)
    info = json.loads((directory / "model.json").read_text())
    cfg = dict(info["model_config"])
    model = create_model(**cfg)
    model.load_state_dict(torch.load(directory / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval(), info


def image_bytes(image: np.ndarray | Image.Image, fmt: str = "JPEG") -> bytes:
    """An image encoded as a JPEG/PNG file: a cell of the serving input's `image` column."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=92)
    return buf.getvalue()


def encode_image(image: np.ndarray | Image.Image, fmt: str = "JPEG") -> str:
    """Base64 text of `image_bytes`: what a JSON request carries in its `image` column."""
    return base64.b64encode(image_bytes(image, fmt)).decode("ascii")


# `box` is typed Any rather than Array(long) / Array(double): MLflow's enforcement refuses an Array(double) of integers
# (the annotation convention) and an Array(long) of floats, without naming the row; the model checks the box itself
# (pyfunc_model.parse_box) and names the row in every refusal.
# `image` is MLflow's `binary` type: JSON clients send base64 text, the scoring server hands the model bytes (and the
# string column of older clients is the same JSON); top-5 are arrays.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image"), ColSpec(AnyType(), "box", required=False)]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("long", "class_id"), ColSpec("double", "score"),
                    ColSpec(Array("string"), "top5_labels"), ColSpec(Array("double"), "top5_scores")]),
)


def logged_model_name(run_tags: dict[str, str], role: str = "model") -> str:
    """What a LoggedModel is, as its name (what the MLflow UI lists): the network, then its fold, tuning trial or
    refit, then the role when the model is not the network itself — `improved_cnn-fold0`, `resnet50-trial3`,
    `resnet18-refit`, `resnet50-rf_model`. MLflow forbids `/ : . % " '` in a LoggedModel name; none appear."""
    parts = [run_tags.get(tag.MODEL, "model")]
    if tag.FOLD in run_tags:
        parts.append(f"fold{run_tags[tag.FOLD]}")
    if tag.TRIAL_NUMBER in run_tags:
        parts.append(f"trial{run_tags[tag.TRIAL_NUMBER]}")
    if tag.SELECTION_RUN_ID in run_tags:
        parts.append("refit")
    if role != "model":
        parts.append(role)
    return "-".join(parts).translate(str.maketrans({c: "_" for c in "/:.%\"'"}))


def log_model(model: torch.nn.Module, info: dict[str, Any], example_images: np.ndarray, role: str = "model",
              extra_artifacts: dict[str, str] | None = None, python_model: Path = PYFUNC_FILE) -> str:
    """Log `model` to the active run as a pyfunc LoggedModel; return its `models:/m-...` URI.

    `role` says what it is to the run (`model`: the trained network; `rf_model`: backbone + forest): the run's tag
    `carsml.<role>_uri` holds the URI (how `resolve_model_uri` finds it); the LoggedModel is named by
    `logged_model_name`. `example_images` (uint8 N x H x W x 3, N >= 2) become the base64 input example: the first
    with a `box` around the whole image, the second without one.
    """
    import carsml

    run_tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags
    height, width = example_images.shape[1:3]
    examples = pd.DataFrame({"image": [image_bytes(img) for img in example_images[:2]],
                             "box": [[0, 0, int(width), int(height)], None]})
    with tempfile.TemporaryDirectory() as tmp:
        bundle = save_bundle(model, info, Path(tmp) / BUNDLE)
        logged = mlflow.pyfunc.log_model(
            name=logged_model_name(run_tags, role),
            python_model=str(python_model),
            artifacts={BUNDLE: str(bundle), **(extra_artifacts or {})},
            code_paths=[str(Path(carsml.__file__).parent)],
            signature=SIGNATURE,
            input_example=examples,
            pip_requirements=_requirements(),
        )
    mlflow.set_tag(f"{tag.PREFIX}{role}_uri", logged.model_uri)
    # what the model is, searchable with search_logged_models
    mlflow.set_logged_model_tags(logged.model_id, {k: run_tags[k] for k in MODEL_TAGS if k in run_tags})
    return logged.model_uri


MODEL_TAGS = ("carsml.entry_point", "carsml.model", "carsml.fold", "carsml.data_digest")


def log_model_metrics(model_uri: str, metrics: dict[str, float], context: str) -> None:
    """Log `metrics` of the active run's LoggedModel `model_uri` against it and against the run's dataset input of
    `context` ("train": the official train split, of which validation is the held-out part; "test"), so the model's
    page shows them with their dataset; they are the run's metrics too (logged once)."""
    run = mlflow.get_run(mlflow.active_run().info.run_id)
    dataset = next((d.dataset for d in run.inputs.dataset_inputs
                    if any(t.key == "mlflow.data.context" and t.value == context for t in d.tags)), None)
    mlflow.log_metrics(metrics, model_id=model_uri.removeprefix("models:/"), dataset=dataset)


def _requirements() -> list[str]:
    import importlib.metadata as md

    pkgs = ["torch", "torchvision", "timm", "pillow", "pandas", "numpy", "scikit-learn", "skops", "mlflow"]
    out = []
    for pkg in pkgs:
        try:
            out.append(f"{pkg}=={md.version(pkg)}")
        except md.PackageNotFoundError:
            continue
    return out


def resolve_model_uri(ref: str, role: str = "model") -> str:
    """A `models:/` URI for `ref`: a run id (its logged model of `role`, see `log_model`), `runs:/<id>/<role>`, or a
    `models:/` URI."""
    ref = ref.strip()
    if ref.startswith("models:/"):
        check_registered(ref)
        return ref
    if ref.startswith("runs:/"):
        run_id, _, sub = ref[len("runs:/"):].partition("/")
        ref, role = run_id, sub or role
    try:
        run = mlflow.get_run(ref)
    except MlflowException as exc:
        raise CarsmlError(f"Unknown MLflow run id {ref!r} (tracking URI {mlflow.get_tracking_uri()}): {exc}") from None
    uri = run.data.tags.get(f"{tag.PREFIX}{role}_uri")
    if not uri:
        raise CarsmlError(
            f"Run {ref} ({run.info.run_name}) holds no carsml model (no tag {tag.PREFIX}{role}_uri); pass a run of a "
            f"training experiment (baseline, improved, transfer, ...) or a models:/ URI."
        )
    return uri


def check_registered(uri: str) -> None:
    """CarsmlError naming what exists when a registry URI (`models:/<name>@<alias>` or `models:/<name>/<version>`)
    names a registered model, alias or version the tracking store does not have; LoggedModel URIs
    (`models:/m-<id>`) pass (a missing one fails where it is downloaded)."""
    name, at, alias = uri.removeprefix("models:/").partition("@")
    name, slash, version = name.partition("/")
    if not (at or slash) or name.startswith("m-"):
        return
    client = mlflow.MlflowClient()
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise CarsmlError(f"{uri!r}: no registered model {name!r} at {mlflow.get_tracking_uri()} (registered: "
                          f"{', '.join(known) or 'none'}); `carsml promote` registers carsml-resnet50 and "
                          f"carsml-resnet50-rf") from None
    aliases = registered.aliases or {}
    if at and alias not in aliases:
        have = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
        raise CarsmlError(f"{uri!r}: registered model {name!r} has no alias {alias!r}; its aliases: {have}")
    if slash and version:
        try:
            client.get_model_version(name, version)
        except MlflowException:
            raise CarsmlError(f"{uri!r}: registered model {name!r} has no version {version!r}") from None


def download_bundle(ref: str, role: str = "model", dst: str | None = None) -> Path:
    """Download the bundle of a run id / models:/ URI and return the local bundle folder."""
    uri = resolve_model_uri(ref, role)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except MlflowException as exc:
        raise CarsmlError(f"Could not load model {uri!r}: {exc}") from None
    found = sorted(local.rglob("model.json"))
    if not found:
        raise CarsmlError(f"Model {uri!r} has no carsml bundle (model.json); it was not logged by carsml.")
    return found[0].parent


def load_model(ref: str, role: str = "model") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a carsml model from a run id, `runs:/` or `models:/` URI."""
    return load_bundle(download_bundle(ref, role))
