"""The study's 5-block baseline CNN, and the shared trunk + head that the improved CNN builds on.

Trunk: five stages Conv2d(3x3, padding 1) -> BatchNorm2d -> ReLU -> MaxPool2d(2, 2) with 16/32/64/128/256
filters. A subclass may append extra blocks (e.g. residual blocks) to any stage, as `ImprovedCNN` does.
Head ("flatten", the study's): flatten (256 x 7 x 7 = 12,544 at 224 px; 256 x (s // 32)^2 in general) ->
8192 -> 1024 -> 512 -> 256 -> classes, each hidden layer Linear -> BatchNorm1d -> ReLU -> Dropout.
Head "gap" (a next step of the report): global average pooling to 256 features instead of the flatten.

Default dropout: the report only says "0.3 to 0.5". We use 0.5 on the widest hidden layer falling evenly to
0.3 on the narrowest, rounded to 0.05 -- (0.5, 0.45, 0.35, 0.3) for the study's four hidden layers -- because
the first layer holds almost all of the head's weights (12,544 x 8,192) and overfits first. A scalar `dropout`
sets every hidden layer (what Optuna tunes); a sequence sets them one by one.

The modules expose timm's model interface (`forward_features`, `forward_head(x, pre_logits=...)`,
`get_classifier`, `reset_classifier`, `num_features`, `pretrained_cfg`) so downstream code treats our CNNs
and timm models alike.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import torch
from torch import nn

from carsml.errors import ConfigError

TRUNK_CHANNELS = (16, 32, 64, 128, 256)
MIN_IMAGE_SIZE = 2 ** len(TRUNK_CHANNELS)  # each stage halves the map; below this the last map is empty
DEFAULT_HEAD_WIDTHS = (8192, 1024, 512, 256)
HEADS = ("flatten", "gap")
DROPOUT_WIDEST, DROPOUT_NARROWEST = 0.5, 0.3
# The study normalises with mean = std = 0.5 (inputs in [-1, 1]) and resizes bilinearly, no centre crop.
DATA_MEAN = DATA_STD = 0.5


def default_dropout(n_layers: int) -> tuple[float, ...]:
    """Per-layer dropout: 0.5 on the first (widest) hidden layer falling evenly to 0.3 on the last."""
    if n_layers <= 1:
        return (DROPOUT_WIDEST,) * n_layers
    step = (DROPOUT_WIDEST - DROPOUT_NARROWEST) / (n_layers - 1)
    return tuple(round(round((DROPOUT_WIDEST - i * step) / 0.05) * 0.05, 2) for i in range(n_layers))


def resolve_dropout(dropout: float | Sequence[float] | None, n_layers: int) -> tuple[float, ...]:
    """Per-layer dropout rates from None (the default schedule), a scalar (all layers) or one per layer."""
    if dropout is None:
        return default_dropout(n_layers)
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool):
        rates = (float(dropout),) * n_layers
    elif isinstance(dropout, Sequence) and not isinstance(dropout, str):
        rates = tuple(float(r) for r in dropout)
        if len(rates) != n_layers:
            raise ConfigError(f"dropout: got {len(rates)} rates {list(rates)} for {n_layers} hidden layers "
                              f"(head_widths); give one rate per hidden layer or a single number")
    else:
        raise ConfigError(f"dropout: expected a number in [0, 1) or one per hidden layer, got {dropout!r}")
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if bad:
        raise ConfigError(f"dropout: rates must be in [0, 1), got {bad[0]}")
    return rates


def check_image_size(image_size: Any) -> int:
    """The input side in pixels; five 2x2 poolings need at least 32."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ConfigError(f"image_size: expected an integer number of pixels, got {image_size!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size: {image_size} px is too small for {len(TRUNK_CHANNELS)} 2x2 poolings; "
                          f"our CNNs need at least {MIN_IMAGE_SIZE} px")
    return image_size


def _check_widths(head_widths: Any) -> tuple[int, ...]:
    try:
        widths = tuple(head_widths)
    except TypeError:
        raise ConfigError(f"head_widths: expected a sequence of positive integers, got {head_widths!r}"
                          ) from None
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ConfigError(f"head_widths: expected positive integers, got {list(widths)}")
    return widths


def check_num_classes(num_classes: Any) -> int:
    """Number of outputs; 0 means no classifier (the model returns its pre-logits features), as in timm."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"num_classes: expected a non-negative integer, got {num_classes!r}")
    return num_classes


def conv_stage(in_chans: int, out_chans: int, extra: nn.Module | None = None) -> nn.Sequential:
    """Conv2d(3x3, padding 1) -> BatchNorm2d -> ReLU -> MaxPool2d(2, 2), then `extra` (if any)."""
    layers: dict[str, nn.Module] = {
        "conv": nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1),
        "bn": nn.BatchNorm2d(out_chans),
        "act": nn.ReLU(inplace=True),
        "pool": nn.MaxPool2d(2, 2),
    }
    if extra is not None:
        layers["extra"] = extra
    return nn.Sequential(OrderedDict(layers))


def hidden_layer(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Dropout."""
    return nn.Sequential(OrderedDict({
        "fc": nn.Linear(in_features, out_features),
        "bn": nn.BatchNorm1d(out_features),
        "act": nn.ReLU(inplace=True),
        "drop": nn.Dropout(dropout),
    }))


class CNNOptions(TypedDict, total=False):
    """The keyword options both our CNNs take (defaults: BaselineCNN's signature)."""

    in_chans: int
    head_widths: Sequence[int]
    dropout: float | Sequence[float] | None
    head: str


class BaselineCNN(nn.Module):
    """The study's baseline: five conv stages and a fully connected head (see the module docstring).

    Args:
        num_classes: outputs of the classifier (0 = none; `forward` then returns the pre-logits features).
        image_size: side of the square input in pixels (>= 32); fixes the flatten size of the "flatten" head.
        in_chans: input channels.
        head_widths: hidden widths of the fully connected head (empty: the classifier sits on the features).
        dropout: None (default schedule), one rate for every hidden layer, or one rate per hidden layer.
        head: "flatten" (the study's) or "gap" (global average pooling before the hidden layers).
        _stage_blocks: for subclasses only: {stage index 0..4: module appended to that stage}.
    """

    model_name = "baseline_cnn"

    def __init__(
        self,
        num_classes: int = 196,
        image_size: int = 224,
        *,
        in_chans: int = 3,
        head_widths: Sequence[int] = DEFAULT_HEAD_WIDTHS,
        dropout: float | Sequence[float] | None = None,
        head: str = "flatten",
        _stage_blocks: Mapping[int, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.image_size = check_image_size(image_size)
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ConfigError(f"in_chans: expected a positive integer, got {in_chans!r}")
        if head not in HEADS:
            raise ConfigError(f"head: expected one of {', '.join(HEADS)}, got {head!r}")
        self.in_chans = in_chans
        self.head_type = head
        self.head_widths = _check_widths(head_widths)
        self.dropout_rates = resolve_dropout(dropout, len(self.head_widths))

        blocks = dict(_stage_blocks or {})
        chans = (in_chans, *TRUNK_CHANNELS)
        self.features = nn.Sequential(*(conv_stage(chans[i], chans[i + 1], blocks.pop(i, None))
                                        for i in range(len(TRUNK_CHANNELS))))
        if blocks:
            raise ValueError(f"_stage_blocks: no stage {sorted(blocks)} (0..{len(TRUNK_CHANNELS) - 1})")

        side = self.image_size // MIN_IMAGE_SIZE  # each MaxPool2d(2, 2) floors: s -> s // 2, five times
        if head == "flatten":
            self.pool: nn.Module = nn.Flatten(1)
            in_features = TRUNK_CHANNELS[-1] * side * side
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            in_features = TRUNK_CHANNELS[-1]
        self.flat_features = in_features
        widths = (in_features, *self.head_widths)
        self.head = nn.Sequential(*(hidden_layer(widths[i], widths[i + 1], p)
                                    for i, p in enumerate(self.dropout_rates)))
        # as in timm, num_features is the width forward_head(pre_logits=True) returns (the last hidden layer)
        self.num_features = self.head_hidden_size = widths[-1]
        self.classifier = self._make_classifier(self.num_classes)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's output map, (N, 256, s // 32, s // 32)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits, or the penultimate (last hidden layer) features when `pre_logits`."""
        x = self.head(self.pool(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, in_chans, s, s) -> logits (N, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final classification layer (nn.Identity when num_classes is 0)."""
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for `num_classes` outputs (0 = remove it)."""
        self.num_classes = check_num_classes(num_classes)
        ref = next(self.features.parameters())  # the new layer lives where (and in the dtype) the model does
        self.classifier = self._make_classifier(self.num_classes).to(device=ref.device, dtype=ref.dtype)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """A timm-style pretrained config: timm.data.resolve_data_config(model=...) works on our CNNs too."""
        return data_config(self.image_size, self.in_chans) | {
            "architecture": self.model_name, "num_classes": self.num_classes, "classifier": "classifier",
            "first_conv": "features.0.conv"}

    def config(self) -> dict[str, Any]:
        """JSON-serialisable create_model() keyword arguments that rebuild this architecture."""
        return {"name": self.model_name, "num_classes": self.num_classes, "image_size": self.image_size,
                "in_chans": self.in_chans, "head_widths": list(self.head_widths),
                "dropout": list(self.dropout_rates), "head": self.head_type}


def data_config(image_size: int = 224, in_chans: int = 3) -> dict[str, Any]:
    """Our CNNs' input pipeline in timm's data-config form: resize to image_size, normalise with 0.5 / 0.5."""
    return {"input_size": (in_chans, image_size, image_size), "interpolation": "bilinear",
            "mean": (DATA_MEAN,) * in_chans, "std": (DATA_STD,) * in_chans,
            "crop_pct": 1.0, "crop_mode": "center"}
