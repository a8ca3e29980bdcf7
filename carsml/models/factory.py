"""Building any model of the study: our two CNNs or any timm model; random, pretrained or from a file.

    create_model(name, num_classes, image_size, pretrained=..., weights=..., dropout=..., seed=..., **opts)
    model_config(model)          -> kwargs that create_model(**cfg) rebuilds the same architecture from
    init_params(model)           -> run params of its start: normalisation, where its weights came from
    resolve_data_config(model)   -> the model's own normalisation and input size

Laid out as timm's models: this module builds (timm's _builder); pretrained.py finds pretrained weights offline
(timm's _hub); weights.py loads weight files (timm's _helpers): `load_weights(model, file)` puts a timm /
torchvision / carsml state dict into a model, keeping its new head; naming.py holds the name a model goes by,
which this module and weights.py both read. Pretrained weights not on this machine and
not downloadable are a CarsmlError naming both remedies, never a silent random initialisation (see
docs/transfer.md).
"""

from __future__ import annotations

import contextlib
import difflib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from torch import nn

from carsml.errors import CarsmlError, ConfigError
from carsml.models.baseline import BaselineCNN, check_image_size, check_num_classes, data_config
from carsml.models.improved import ImprovedCNN
from carsml.models.naming import TIMM_ATTR, architecture_name, timm_record
from carsml.models.pretrained import create_pretrained, remember_weights, weights_record
from carsml.models.weights import load_weights

OUR_MODELS: dict[str, type[BaselineCNN]] = {"baseline_cnn": BaselineCNN, "improved_cnn": ImprovedCNN}
OUR_OPTIONS = {
    "baseline_cnn": ("in_chans", "head_widths", "head"),
    "improved_cnn": ("in_chans", "head_widths", "head", "se", "late_residual"),
}
# Options that only make sense on improved_cnn. The training config passes them to both CNNs, so their "off"
# value is accepted (a no-op) on baseline_cnn, while "on" is an error rather than a silent no-op.
IMPROVED_ONLY = ("se", "late_residual")


# ----------------------------------------------------------------------------------------------- create_model


def create_model(
    name: str,
    num_classes: int,
    image_size: int = 224,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    dropout: float | Sequence[float] | None = None,
    seed: int | None = None,
    **opts: Any,
) -> nn.Module:
    """Build `name` (baseline_cnn, improved_cnn or a timm model) with a `num_classes`-way head.

    Args:
        name: our CNN's name or any timm model name (optionally with a pretrained tag: resnet50.a1_in1k).
        num_classes: outputs of the new head (0 = no head; the model returns its pre-logits features).
        image_size: input side in pixels (our CNNs' flatten size depends on it; remembered for timm models).
        pretrained: load timm's pretrained weights (from the cache or downloaded; CarsmlError if neither).
        weights: a local checkpoint to load instead (see `load_weights`); excludes `pretrained`.
        dropout: our CNNs' hidden-layer dropout (one rate, or one per layer) or timm's `drop_rate`.
        seed: when given, the initial weights (everything not loaded from pretrained weights or `weights`)
            depend on this seed alone, and the caller's random state is left as it was (see `seeded`).
        **opts: our CNNs' options (in_chans, head_widths, head, se, late_residual) or timm model kwargs.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name: expected a non-empty string, got {name!r}")
    check_num_classes(num_classes)
    if pretrained and weights not in (None, ""):
        raise ConfigError(f"model {name!r}: give pretrained=True or weights={str(weights)!r}, not both")
    if name in OUR_MODELS and pretrained:
        raise ConfigError(f"model {name!r}: there are no pretrained weights for our CNNs; train one, "
                          f"or pass weights=<file> with a checkpoint of it")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"seed: expected an integer >= 0 or None, got {seed!r}")
    with seeded(seed) if seed is not None else contextlib.nullcontext():
        if name in OUR_MODELS:
            model: nn.Module = _create_ours(name, num_classes, image_size, dropout, opts)
        else:
            model = _create_timm(name, num_classes, image_size, dropout, opts, pretrained=bool(pretrained))
    if weights not in (None, ""):
        load_weights(model, weights)
        remember_weights(model, "file", Path(weights).expanduser())
    return model


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded with `seed`; the caller's generator states are untouched.

    create_model builds every model on the CPU, so the CPU generator is the only one initialisation draws
    from: only it is forked (`fork_rng(devices=[])`, which neither initialises nor touches CUDA) and seeded.
    torch.manual_seed would also reseed the CUDA / MPS / XPU generators, which that fork does not restore.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def _create_ours(name: str, num_classes: int, image_size: int, dropout: Any,
                 opts: dict[str, Any]) -> BaselineCNN:
    opts = dict(opts)
    if name == "baseline_cnn":
        for key in IMPROVED_ONLY:
            if opts.pop(key, False):
                raise ConfigError(f"{key}=True: baseline_cnn has no residual blocks; use model improved_cnn")
    unknown = sorted(set(opts) - set(OUR_OPTIONS[name]))
    if unknown:
        raise ConfigError(f"model {name!r}: unknown option(s) {', '.join(unknown)}; "
                          f"valid: dropout, {', '.join(OUR_OPTIONS[name])}")
    return OUR_MODELS[name](num_classes, image_size, dropout=dropout, **opts)


def _create_timm(name: str, num_classes: int, image_size: int, dropout: Any, opts: dict[str, Any],
                 *, pretrained: bool) -> nn.Module:
    _check_timm_name(name)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size: expected a positive integer number of pixels, got {image_size!r}")
    kwargs = dict(opts)
    if dropout is not None:
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout: expected a number in [0, 1) for timm model {name!r}, "
                              f"got {dropout!r}")
        kwargs["drop_rate"] = float(dropout)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size and cfg.input_size[-1] != image_size:
        kwargs.setdefault("img_size", image_size)  # e.g. ViTs: position embeddings are built for one size
    if pretrained:
        model = create_pretrained(name, _timm_create, num_classes=num_classes, **kwargs)
    else:
        model = _timm_create(name, num_classes=num_classes, **kwargs)
    # not every timm model keeps its drop_rate as an attribute (DenseNet does not), so remember it here
    setattr(model, TIMM_ATTR, {"name": name, "image_size": image_size, "dropout": kwargs.get("drop_rate"),
                                "opts": dict(opts)})
    return model


def _timm_create(name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as exc:  # an option the model's constructor does not take
        opts = sorted(set(kwargs) - {"pretrained", "pretrained_cfg_overlay", "num_classes"})
        raise ConfigError(f"timm model {name!r} rejected option(s) {', '.join(opts) or '(none)'}: "
                          f"{exc}") from exc


def _check_timm_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see carsml.models.list_models()"
        raise ConfigError(f"model {name!r}: unknown; expected baseline_cnn, improved_cnn or a timm "
                          f"model{hint}")
    if "." in name and _tagged_cfg(name) is None:
        arch, tag = name.split(".", 1)
        tags = timm.list_pretrained(f"{arch}.*")
        raise ConfigError(f"model {name!r}: timm has no pretrained tag {tag!r} for {arch}; "
                          f"known: {', '.join(tags) or '(none)'}")


def _tagged_cfg(name: str) -> Any:
    """timm's pretrained config for `arch.tag`; None for an unknown tag (timm raises or returns None)."""
    try:
        return timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    except RuntimeError:
        return None


def check_input_size(model: nn.Module, image_size: int) -> None:
    """ConfigError unless `model` can take `image_size` px inputs: one forward pass of a blank image (eval mode, no
    gradients, the model's own device and mode restored), so a too-small size fails before training, not in its first
    step (VGG-16 needs 32 px, DenseNet-121 31 px; a ViT only takes the size it was built for)."""
    if isinstance(model, BaselineCNN):
        return  # our CNNs check their size when built
    first = next(model.parameters(), None)
    channels = int(timm_record(model).get("opts", {}).get("in_chans", 3))
    x = torch.zeros(1, channels, image_size, image_size, device=first.device if first is not None else "cpu")
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except (RuntimeError, AssertionError, ValueError) as exc:
        name = architecture_name(model) or type(model).__name__
        default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"image_size={image_size}: model {name!r} cannot take {image_size} px images ({reason}); "
                          f"use a larger image_size (its pretrained config uses {default})") from None
    finally:
        model.train(training)


def list_models() -> list[str]:
    """Every name create_model accepts: our CNNs, then all timm models."""
    return [*OUR_MODELS, *timm.list_models()]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def feature_dim(model: nn.Module) -> int:
    """Width of `forward_head(x, pre_logits=True)`: what a feature extractor (e.g. the RandomForest) gets."""
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not isinstance(width, int):
        raise CarsmlError(f"{type(model).__name__} has neither head_hidden_size nor num_features")
    return width


# ------------------------------------------------------------------------------------- config round trips


def init_params(model: nn.Module) -> dict[str, str]:
    """Run params of the model's start: the normalisation training uses (data_mean, data_std: the model's data config)
    and, for loaded weights, where they came from (weights_source, weights_file, weights_sha256) and what their data
    config says of the rest (weights_interpolation, weights_crop_pct; carsml's cache resizes the whole crop, bilinear
    and antialiased, at every size)."""
    data_cfg = resolve_data_config(model)
    params = {"data_mean": ",".join(f"{v:g}" for v in data_cfg["mean"]),
              "data_std": ",".join(f"{v:g}" for v in data_cfg["std"])}
    record = weights_record(model)
    if record:
        params.update(record, weights_interpolation=str(data_cfg.get("interpolation", "")),
                      weights_crop_pct=f"{data_cfg.get('crop_pct', 1.0):g}")
    return params


def model_config(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable kwargs with which `create_model(**cfg)` rebuilds `model`'s architecture.

    Never includes pretrained/weights: the weights travel in the state dict.
    """
    if isinstance(model, BaselineCNN):
        cfg = model.config()
    else:
        name = architecture_name(model)
        if name is None:
            raise CarsmlError(f"model_config: {type(model).__name__} is neither one of our CNNs nor a "
                              f"timm model")
        made = timm_record(model)
        pcfg: Mapping[str, Any] = model.pretrained_cfg  # a Mapping with an architecture: architecture_name
        size = made.get("image_size") or pcfg.get("input_size", (3, 224, 224))[-1]
        cfg = {"name": name, "num_classes": int(model.num_classes), "image_size": int(size)}
        dropout = made.get("dropout", getattr(model, "drop_rate", None))
        if isinstance(dropout, (int, float)):
            cfg["dropout"] = float(dropout)
        cfg.update(made.get("opts") or {})
    try:
        json.dumps(cfg)
    except TypeError as exc:
        raise CarsmlError(f"model_config: option values are not JSON-serialisable ({exc}): {cfg!r}") from exc
    return cfg


def resolve_data_config(name_or_model: str | nn.Module, image_size: int | None = None) -> dict[str, Any]:
    """A model's input pipeline: mean, std, interpolation, input_size (C, H, W), crop_pct, crop_mode.

    Our CNNs: the study's mean = std = 0.5 and a bilinear resize. timm models: timm's own config for their
    pretrained weights (ImageNet statistics for most). For models built by create_model, input_size uses the
    image_size they were built for; `image_size` overrides it.
    """
    if isinstance(name_or_model, str):
        name = name_or_model
        if name in OUR_MODELS:
            cfg = data_config(check_image_size(image_size or 224))
        else:
            _check_timm_name(name)
            pcfg = timm.models.get_pretrained_cfg(name)
            cfg = timm.data.resolve_data_config(pretrained_cfg=pcfg.to_dict() if pcfg else {})
    elif isinstance(name_or_model, BaselineCNN):
        cfg = data_config(name_or_model.image_size, name_or_model.in_chans)
    elif isinstance(name_or_model, nn.Module):
        cfg = timm.data.resolve_data_config(model=name_or_model)
        image_size = image_size or timm_record(name_or_model).get("image_size")
    else:
        raise ConfigError(f"resolve_data_config: expected a model name or module, got {type(name_or_model)}")
    cfg = dict(cfg)
    if image_size:
        cfg["input_size"] = (cfg["input_size"][0], int(image_size), int(image_size))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
