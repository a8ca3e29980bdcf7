"""CARS_IMPROVED_CNN: the baseline trunk plus residual blocks, and the report's next-step options.

The study adds one residual block on the 32-channel maps and one on the 64-channel maps (stages 1 and 2 of
the trunk); each is conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the block input, then ReLU. We place each
block on its stage's pooled output (the parameter count is the same either side of the pooling; after it, the
block costs 4x less compute). At 224 px and 196 classes the network has about 112M trainable parameters,
almost all in the head's first layer.

Options (off by default, so the defaults are the study's network):
    se=True             squeeze-and-excitation channel attention inside every residual block
    late_residual=True  residual blocks on the 128- and 256-channel maps too
    head="gap"          global average pooling head (from BaselineCNN) instead of the 12,544-wide flatten
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from carsml.models.baseline import TRUNK_CHANNELS, BaselineCNN, CNNOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11 on

RESIDUAL_STAGES = (1, 2)  # the 32- and 64-channel maps, as in the study
LATE_RESIDUAL_STAGES = (3, 4)  # the 128- and 256-channel maps
SE_REDUCTION = 16
SE_MIN_HIDDEN = 4


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: rescale each channel by a gate computed from the globally pooled map."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        hidden = max(channels // reduction, SE_MIN_HIDDEN)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class ResidualBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN [-> SE], add the input, ReLU. Keeps channels and map size."""

    def __init__(self, channels: int, *, se: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se: nn.Module = SqueezeExcite(channels) if se else nn.Identity()
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(self.se(out) + x)


class ImprovedCNN(BaselineCNN):
    """BaselineCNN with residual blocks on the 32- and 64-channel maps (optionally more; see the module doc).

    Args:
        se: squeeze-and-excitation attention in every residual block.
        late_residual: residual blocks on the 128- and 256-channel maps too.
        Everything else as BaselineCNN (num_classes, image_size and the `CNNOptions` in_chans, head_widths,
        dropout, head, with BaselineCNN's defaults).
    """

    model_name = "improved_cnn"

    def __init__(
        self,
        num_classes: int = 196,
        image_size: int = 224,
        *,
        se: bool = False,
        late_residual: bool = False,
        **options: Unpack[CNNOptions],
    ) -> None:
        stages = RESIDUAL_STAGES + (LATE_RESIDUAL_STAGES if late_residual else ())
        blocks = {i: ResidualBlock(TRUNK_CHANNELS[i], se=bool(se)) for i in stages}
        super().__init__(num_classes, image_size, **options, _stage_blocks=blocks)
        self.se = bool(se)
        self.late_residual = bool(late_residual)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable create_model() keyword arguments that rebuild this architecture."""
        return super().config() | {"se": self.se, "late_residual": self.late_residual}
