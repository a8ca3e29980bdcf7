"""The name a model of the study goes by: what create_model remembers on timm models, read back by model_config
(factory.py) and by the weight-file messages (weights.py), which must not import each other's modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from carsml.models.baseline import BaselineCNN

TIMM_ATTR = "_carsml_timm"  # what create_model remembers on a timm model, for model_config


def timm_name(pcfg: Mapping[str, Any]) -> str:
    """`architecture.tag` (or the bare architecture) from a timm pretrained config."""
    tag = pcfg.get("tag")
    return f"{pcfg['architecture']}.{tag}" if tag else str(pcfg["architecture"])


def timm_record(model: nn.Module) -> dict[str, Any]:
    """What create_model remembered on a timm model (name, image_size, dropout, opts); {} for any other."""
    return getattr(model, TIMM_ATTR, None) or {}


def architecture_name(model: nn.Module) -> str | None:
    """The create_model name of `model` (our CNN's, or the timm name it was built under); None if neither."""
    if isinstance(model, BaselineCNN):
        return model.model_name
    pcfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(pcfg, Mapping) or not pcfg.get("architecture"):
        return None
    return timm_record(model).get("name") or timm_name(pcfg)
