"""One way to build any model of the study: our two CNNs or any timm model; random, pretrained or from a file.

    create_model(name, num_classes, image_size, pretrained=..., weights=..., dropout=..., **opts)
    model_config(model)          -> kwargs that create_model(**cfg) rebuilds the same architecture from
    resolve_data_config(model)   -> the model's own normalisation and input size
    load_weights(model, file)    -> a timm / torchvision / carsml state dict into a model, new head kept

Pretrained weights come through timm's Hugging Face hub path. Offline they must already be in the Hugging Face
(or torch hub) cache, or be given as a file with `weights=`; anything else is a CarsmlError naming both
remedies, never a silent random initialisation (see docs/transfer.md).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import timm.data
import torch
from torch import nn

from carsml.errors import CarsmlError, ConfigError
from carsml.models.baseline import BaselineCNN, check_image_size, check_num_classes, data_config
from carsml.models.improved import ImprovedCNN

log = logging.getLogger(__name__)

OUR_MODELS: dict[str, type[BaselineCNN]] = {"baseline_cnn": BaselineCNN, "improved_cnn": ImprovedCNN}
OUR_OPTIONS = {
    "baseline_cnn": ("in_chans", "head_widths", "head"),
    "improved_cnn": ("in_chans", "head_widths", "head", "se", "late_residual"),
}
# Options that only make sense on improved_cnn. The training config passes them to both CNNs, so their "off"
# value is accepted (a no-op) on baseline_cnn, while "on" is an error rather than a silent no-op.
IMPROVED_ONLY = ("se", "late_residual")
STATE_DICT_WRAPPERS = ("model_state_dict", "state_dict", "model")
# Names timm gives the functions converting foreign checkpoints (torchvision, original repos) to its layout.
TIMM_FILTER_NAMES = ("checkpoint_filter_fn", "_filter_fn", "_filter_torchvision_pretrained")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
PROBE_TIMEOUT_S = 3.0
MAX_LISTED_KEYS = 5
_TRUE = {"1", "on", "yes", "true"}
_TIMM_ATTR = "_carsml_timm"  # what create_model remembers on a timm model, for model_config


# ----------------------------------------------------------------------------------------------- create_model


def create_model(
    name: str,
    num_classes: int,
    image_size: int = 224,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    dropout: float | Sequence[float] | None = None,
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
        **opts: our CNNs' options (in_chans, head_widths, head, se, late_residual) or timm model kwargs.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name: expected a non-empty string, got {name!r}")
    check_num_classes(num_classes)
    if pretrained and weights not in (None, ""):
        raise ConfigError(f"model {name!r}: give pretrained=True or weights={str(weights)!r}, not both")
    if name in OUR_MODELS:
        if pretrained:
            raise ConfigError(f"model {name!r}: there are no pretrained weights for our CNNs; train one, "
                              f"or pass weights=<file> with a checkpoint of it")
        model: nn.Module = _create_ours(name, num_classes, image_size, dropout, opts)
    else:
        model = _create_timm(name, num_classes, image_size, dropout, opts, pretrained=bool(pretrained))
    if weights not in (None, ""):
        load_weights(model, weights)
    return model


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
        model = _create_timm_pretrained(name, num_classes, kwargs)
    else:
        model = _timm_create(name, num_classes=num_classes, **kwargs)
    # not every timm model keeps its drop_rate as an attribute (DenseNet does not), so remember it here
    setattr(model, _TIMM_ATTR, {"name": name, "image_size": image_size, "dropout": kwargs.get("drop_rate"),
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


def model_config(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable kwargs with which `create_model(**cfg)` rebuilds `model`'s architecture.

    Never includes pretrained/weights: the weights travel in the state dict.
    """
    if isinstance(model, BaselineCNN):
        cfg = model.config()
    else:
        pcfg = getattr(model, "pretrained_cfg", None)
        if not isinstance(pcfg, Mapping) or not pcfg.get("architecture"):
            raise CarsmlError(f"model_config: {type(model).__name__} is neither one of our CNNs nor a "
                              f"timm model")
        made = getattr(model, _TIMM_ATTR, None) or {}
        size = made.get("image_size") or pcfg.get("input_size", (3, 224, 224))[-1]
        cfg = {"name": made.get("name") or _timm_name(pcfg), "num_classes": int(model.num_classes),
               "image_size": int(size)}
        dropout = made.get("dropout", getattr(model, "drop_rate", None))
        if isinstance(dropout, (int, float)):
            cfg["dropout"] = float(dropout)
        cfg.update(made.get("opts") or {})
    try:
        json.dumps(cfg)
    except TypeError as exc:
        raise CarsmlError(f"model_config: option values are not JSON-serialisable ({exc}): {cfg!r}") from exc
    return cfg


def _timm_name(pcfg: Mapping[str, Any]) -> str:
    tag = pcfg.get("tag")
    return f"{pcfg['architecture']}.{tag}" if tag else str(pcfg["architecture"])


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
        image_size = image_size or (getattr(name_or_model, _TIMM_ATTR, None) or {}).get("image_size")
    else:
        raise ConfigError(f"resolve_data_config: expected a model name or module, got {type(name_or_model)}")
    cfg = dict(cfg)
    if image_size:
        cfg["input_size"] = (cfg["input_size"][0], int(image_size), int(image_size))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


# ---------------------------------------------------------------------------------------- pretrained (hub)


@dataclass
class _Source:
    """Where timm would fetch a model's pretrained weights, and whether they are on this machine already."""

    kind: str  # "hf-hub", "url" or "" (no pretrained weights)
    where: str  # the hub repo id or the url
    cached: str | None = None  # the local file holding them, if any
    cache_dir: str = ""


def _create_timm_pretrained(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    pcfg = timm.models.get_pretrained_cfg(name)
    source = _pretrained_source(pcfg.to_dict() if pcfg else {})
    if not source.kind:
        raise CarsmlError(f"timm has no pretrained weights for {name!r}; pass weights=<file> with a "
                          f"checkpoint of it, or pretrained=false for a random initialisation")
    overlay: dict[str, Any] = {}
    if source.cached and source.kind == "hf-hub":
        # The cached file goes through timm's own pretrained loading (filters, head replacement) but skips
        # the hub's freshness check, which retries for about a minute when there is no network.
        overlay = {"file": source.cached}
    elif not source.cached:
        reason = _unreachable_reason(source)
        if reason:
            raise CarsmlError(_pretrained_help(name, source, reason))
    try:
        return _timm_create(name, pretrained=True, pretrained_cfg_overlay=overlay or None,
                            num_classes=num_classes, **kwargs)
    except ConfigError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:  # hub, download and corrupt-file errors
        raise CarsmlError(_pretrained_help(name, source, f"loading them failed: {exc}")) from exc


def _pretrained_source(pcfg: Mapping[str, Any]) -> _Source:
    """Mirror timm's choice of weight source (the hub first, then a url); look for it in the caches."""
    if pcfg.get("hf_hub_id"):
        repo, _, revision = str(pcfg["hf_hub_id"]).partition("@")
        source = _Source("hf-hub", repo, cache_dir=_hf_cache_dir())
        if pcfg.get("custom_load"):
            return source  # a model-specific loader: leave it to timm's regular path
        from huggingface_hub import try_to_load_from_cache

        for filename in _hf_filenames(pcfg.get("hf_hub_filename")):
            found = try_to_load_from_cache(repo, filename, cache_dir=source.cache_dir,
                                           revision=revision or None)
            if isinstance(found, str):
                source.cached = found
                break
        return source
    if pcfg.get("url"):
        cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
        local = cache_dir / Path(urlparse(pcfg["url"]).path).name
        return _Source("url", str(pcfg["url"]), cached=str(local) if local.is_file() else None,
                       cache_dir=str(cache_dir))
    return _Source("", "")


def _hf_filenames(filename: str | None) -> list[str]:
    """The files timm tries on the hub for a model: the safetensors alternative first, then the named file."""
    filename = filename or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return [filename]
    alternatives = {"pytorch_model.bin": "model.safetensors",
                    "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    safe = alternatives.get(filename)
    if safe is None and filename.endswith(".bin"):
        safe = filename[:-4] + ".safetensors"
    return [f for f in (safe, filename) if f]


def _hf_cache_dir() -> str:
    """The Hugging Face hub cache, from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _unreachable_reason(source: _Source) -> str:
    """Why a download cannot work now ("" if it may): offline mode, or the host does not answer quickly."""
    if source.kind == "hf-hub":
        if _hf_offline():
            return f"HF_HUB_OFFLINE is set and they are not in the Hugging Face cache ({source.cache_dir})"
        from huggingface_hub import constants

        url = urlparse(os.environ.get("HF_ENDPOINT") or str(constants.ENDPOINT))
    else:
        url = urlparse(source.where)
    if any(os.environ.get(v) for v in PROXY_VARS):
        return ""  # a direct connection says nothing about the proxy: let the download itself report
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    if not _can_connect(host, port, PROBE_TIMEOUT_S):
        return f"{host} is unreachable (no network?) and they are not in the cache ({source.cache_dir})"
    return ""


def _can_connect(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` s (DNS included, hence the thread)."""
    ok: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _pretrained_help(name: str, source: _Source, reason: str) -> str:
    if source.kind == "hf-hub":
        where = f"{source.where} on the Hugging Face hub"
        copy = ("its Hugging Face cache (~/.cache/huggingface, or $HF_HOME) to ~/.cache/huggingface here "
                "(or anywhere, with HF_HOME pointing at it) and set HF_HUB_OFFLINE=1")
    else:
        where = source.where
        copy = ("its torch hub cache (~/.cache/torch/hub/checkpoints, or $TORCH_HOME/hub/checkpoints) to "
                "the same place here")
    return (f"pretrained weights for {name!r} ({where}) are not available: {reason}. Either\n"
            f"  1. download them on a machine with network access:\n"
            f"       python -c \"import timm; timm.create_model('{name}', pretrained=True)\"\n"
            f"     then copy {copy}; or\n"
            f"  2. pass weights=<file> with a timm or torchvision state dict of {name!r} "
            f"(see docs/transfer.md).")


# -------------------------------------------------------------------------------------------- weights files


@dataclass
class _Match:
    """How a state dict lines up with a model: what would load and what does not fit."""

    label: str
    to_load: dict[str, torch.Tensor]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local checkpoint into `model` (in place; returned for chaining), keeping the model's own head.

    Accepts a timm, torchvision or carsml state dict (.pt/.pth/.bin via torch.load, or .safetensors), also
    wrapped in a dict under "model_state_dict", "state_dict" or "model". Classifier tensors whose shapes do
    not fit the model's head (another number of classes) are dropped, leaving the new head freshly
    initialised; everything else must match exactly. For timm models, timm's own converters for foreign
    layouts (e.g. torchvision's VGG) are tried; a file whose tensors match the model's one-to-one in order but
    under other names (torchvision's EfficientNet) is loaded in that order, with a warning. Anything else is
    a ConfigError listing the missing, unexpected and mismatched keys.
    """
    path = Path(path).expanduser()
    state = read_state_dict(path)
    target = model.state_dict()
    head = _classifier_name(model)
    candidates = [("as saved", state), *_timm_conversions(model, state)]
    matches = [_match(label, sd, target, head) for label, sd in candidates]
    best = next((m for m in matches if m.ok), None)
    if best is None:
        best = _positional_match(state, target, head)
        if best is not None:
            log.warning("weights %s: tensor names differ from %s's; loaded by position (every shape "
                        "matches in order)", path, type(model).__name__)
    if best is None:
        raise ConfigError(_mismatch_message(path, model, min(matches, key=lambda m: m.problems)))
    model.load_state_dict({**target, **best.to_load}, strict=True)
    new_head = [k for k in target if _in_head(k, head) and k not in best.to_load]
    log.info("weights %s loaded into %s (%s)%s", path, type(model).__name__, best.label,
             f"; freshly initialised: {', '.join(new_head)}" if new_head else "")
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, unwrapped, without DataParallel/compile prefixes."""
    if not path.is_file():
        raise ConfigError(f"weights: file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors share no base class
        raise ConfigError(f"weights: cannot read {path} as a PyTorch or safetensors checkpoint: "
                          f"{exc}") from exc
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in STATE_DICT_WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            keys = sorted(map(str, obj))[:MAX_LISTED_KEYS]
            raise ConfigError(f"weights: {path} holds a dict with keys {keys}...; expected a state dict, "
                              f"or one under {', '.join(STATE_DICT_WRAPPERS)}")
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not _is_state_dict(obj):
        raise ConfigError(f"weights: {path} does not hold a state dict (names -> tensors); "
                          f"got {type(obj).__name__}")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):  # DataParallel / DistributedDataParallel, torch.compile
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _classifier_name(model: nn.Module) -> str | None:
    """The module path of the model's classifier ("fc", "head.fc", "classifier"...), found by identity."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    classifier = get()
    return next((name for name, module in model.named_modules() if module is classifier and name), None)


def _in_head(key: str, head: str | None) -> bool:
    return head is not None and (key == head or key.startswith(head + "."))


def _match(label: str, state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
           head: str | None) -> _Match:
    to_load, unexpected, mismatched = {}, [], []
    for key, value in state.items():
        if key not in target:
            if not _in_head(key, head):  # head tensors the new head lacks (num_classes=0) are dropped
                unexpected.append(key)
        elif tuple(value.shape) == tuple(target[key].shape):
            to_load[key] = value
        elif not _in_head(key, head):
            mismatched.append(f"{key} (file {tuple(value.shape)}, model {tuple(target[key].shape)})")
    # BatchNorm's step counters postdate some checkpoints (torchvision's DenseNet files); like PyTorch,
    # tolerate their absence: they only matter for BatchNorm with momentum=None.
    missing = [k for k in target if k not in state and not _in_head(k, head)
               and not k.endswith(".num_batches_tracked")]
    return _Match(label, to_load, missing, unexpected, mismatched)


def _timm_conversions(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[tuple[str, dict]]:
    """The state dict as converted by each checkpoint filter the model's timm module defines (if any)."""
    if not type(model).__module__.startswith("timm."):
        return []
    module = sys.modules.get(type(model).__module__)
    out = []
    for fname in TIMM_FILTER_NAMES:
        fn: Callable[..., Any] | None = getattr(module, fname, None)
        if not callable(fn):
            continue
        try:
            try:
                converted = fn(dict(state), model)
            except TypeError:  # older filters take the state dict only
                converted = fn(dict(state))
        except Exception as exc:  # a filter written for other checkpoints may fail on this one
            log.debug("timm filter %s does not apply: %s", fname, exc)
            continue
        if isinstance(converted, Mapping) and _is_state_dict(converted):
            out.append((f"converted by timm's {fname}", dict(converted)))
    return out


def _positional_match(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                      head: str | None) -> _Match | None:
    """Pair tensors by order when names differ but the layouts are the same network (every shape equal)."""
    if len(state) != len(target):
        return None
    to_load = {}
    for value, (key, want) in zip(state.values(), target.items(), strict=True):
        if tuple(value.shape) == tuple(want.shape) and value.is_floating_point() == want.is_floating_point():
            to_load[key] = value
        elif not (_in_head(key, head) and value.ndim == want.ndim):  # a head for another class count is ok
            return None
    return _Match("by position", to_load, [], [], [])


def _mismatch_message(path: Path, model: nn.Module, match: _Match) -> str:
    def listed(kind: str, keys: list[str]) -> str:
        more = f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED_KEYS else ""
        return f"{kind}: {', '.join(keys[:MAX_LISTED_KEYS])}{more}"

    kinds = (("missing", match.missing), ("unexpected", match.unexpected),
             ("shape mismatch", match.mismatched))
    parts = [listed(kind, keys) for kind, keys in kinds if keys]
    try:
        arch = model_config(model)["name"]
    except CarsmlError:
        arch = type(model).__name__
    return (f"weights: {path} does not fit model {arch!r} (closest reading: {match.label}); "
            + "; ".join(parts) + ". Expected a state dict of the same architecture (any number of classes).")
