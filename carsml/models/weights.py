"""Weight files into models: a timm, torchvision or carsml state dict, matched key by key, converted by timm's
own filters or paired by position, with the model's own head kept where the class count differs.

    load_weights(model, file)    -> the file's tensors loaded into `model` (in place), new head kept
    read_state_dict(file)        -> the state dict a .pt / .pth / .bin / .safetensors file holds, unwrapped
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carsml.errors import ConfigError
from carsml.models.naming import architecture_name

log = logging.getLogger(__name__)

STATE_DICT_WRAPPERS = ("model_state_dict", "state_dict", "model")
# Names timm gives the functions converting foreign checkpoints (torchvision, original repos) to its layout.
TIMM_FILTER_NAMES = ("checkpoint_filter_fn", "_filter_fn", "_filter_torchvision_pretrained")
MAX_LISTED_KEYS = 5


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
    arch = architecture_name(model) or type(model).__name__
    return (f"weights: {path} does not fit model {arch!r} (closest reading: {match.label}); "
            + "; ".join(parts) + ". Expected a state dict of the same architecture (any number of classes).")
