"""Parts every entry point shares: resolving the `data` option, locating the cache, building the model from a
training config, and the option checks of inference entry points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from carsml.data.cache import default_cache_dir
from carsml.data.readers import load_dataset
from carsml.data.synthetic import ensure_synthetic
from carsml.data.table import Dataset
from carsml.engine.device import resolve_device
from carsml.errors import ConfigError
from carsml.models.factory import check_input_size, create_model


def cache_root(cfg: dict[str, Any]) -> Path:
    """The cache directory of this config (`cache_dir`, else $CARSML_CACHE or ~/.cache/carsml)."""
    return Path(cfg["cache_dir"]).expanduser() if cfg.get("cache_dir") else default_cache_dir()


def resolve_dataset(cfg: dict[str, Any]) -> Dataset:
    """Read the dataset named by `cfg["data"]`: the embedded synthetic set (generated on first use) or a path."""
    if cfg["data"] == "synthetic":
        root = ensure_synthetic(
            cache_root(cfg) / "synthetic",
            num_classes=cfg["synth_classes"],
            images_per_class=cfg["synth_images_per_class"],
            seed=cfg["synth_seed"],
        )
        return load_dataset(root)
    return load_dataset(cfg["data"])


def limit_classes(dataset: Dataset, max_classes: int | None) -> Dataset:
    """Keep only the first `max_classes` classes (None = all) for quick runs."""
    if not max_classes or max_classes >= dataset.num_classes:
        return dataset
    table = dataset.table[dataset.table["label"] < max_classes].reset_index(drop=True)
    return Dataset(table, dataset.class_names[:max_classes], dataset.layout, dataset.root, dataset.has_images,
                   [*dataset.notes, f"limited to the first {max_classes} classes"])


OUR_CNNS = ("baseline_cnn", "improved_cnn")


def parse_widths(text: Any) -> tuple[int, ...]:
    """The `head_widths` option ("512,256") as integers; ConfigError naming the option for anything else."""
    parts = [w.strip() for w in str(text).split(",") if w.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"head_widths (--head-widths): expected comma-separated positive integers such as 512,256, "
                          f"got {text!r}")
    return tuple(int(p) for p in parts)


def model_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """create_model keyword arguments from a training config (our CNNs' options only apply to them)."""
    kwargs: dict[str, Any] = {"dropout": cfg["dropout"]}
    if cfg["model"] in OUR_CNNS:
        kwargs["head_widths"] = parse_widths(cfg["head_widths"])
        kwargs["head"] = cfg["head"]
        kwargs["se"] = cfg["se"]
        if cfg["model"] == "improved_cnn":
            kwargs["late_residual"] = cfg["late_residual"]
    for key in ("pretrained", "weights"):
        if key in cfg and cfg[key] not in ("", None):
            kwargs[key] = cfg[key]
    rate = cfg["drop_path_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ConfigError(f"drop_path_rate: expected a number in [0, 1) (0 = off), got {rate!r}")
    if rate > 0:  # timm's VGG / DenseNet reject the keyword even at 0; our CNNs reject it (no stochastic depth)
        kwargs["drop_path_rate"] = float(rate)
    return kwargs

def build_model(cfg: dict[str, Any], num_classes: int, *, seed: int | None = None, for_resume: bool = False,
                **overrides: Any) -> nn.Module:
    """The network `cfg` configures, with a `num_classes`-way head: the one model builder of the entry points.

    Its initial weights depend on `seed` alone (default: cfg's `seed`), whatever ran before. A local `weights` file
    takes precedence over `pretrained` (so the offline remedy is one option). A resumed run restores every tensor from
    its checkpoint (`for_resume`), so it neither needs nor asks for pretrained weights. `overrides` replace model
    options (e.g. the widest dropout a search will try, to check the options before it starts). An image size the model
    cannot take is a ConfigError here, before any run (`check_input_size`).
    """
    kwargs = {**model_kwargs(cfg), **overrides}
    if cfg.get("weights"):
        kwargs.pop("pretrained", None)
    if for_resume:
        kwargs.pop("pretrained", None)
        kwargs.pop("weights", None)
    model = create_model(cfg["model"], num_classes, cfg["image_size"], seed=cfg["seed"] if seed is None else seed,
                         **kwargs)
    check_input_size(model, int(cfg["image_size"]))
    return model


def check_inference(cfg: dict[str, Any]) -> None:
    """device and batch_size of an inference entry point (amp is a checked choice already), before any run."""
    resolve_device(str(cfg["device"]))
    check_positive(cfg, "batch_size")


def check_positive(cfg: dict[str, Any], *keys: str) -> None:
    """Each cfg[key] must be an integer >= 1."""
    for key in keys:
        if int(cfg[key]) < 1:
            raise ConfigError(f"Option {key!r}: expected a positive integer; got {cfg[key]!r}")
