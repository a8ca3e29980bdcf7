"""Exponential moving average (EMA) of a model's weights, evaluated and selected on instead of the raw weights.

Every floating-point entry of the state dict (weights and BatchNorm running statistics) is averaged after each optimizer
step; integer buffers (BatchNorm's batch counters) are copied. The decay warms up as in timm's ModelEmaV2/V3,
`min(decay, (1 + t) / (10 + t))` at update t, so early averages are not dominated by the random initial weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


class WeightEMA:
    """The running average of `model`'s state; `applied(model)` swaps it in for evaluation and back."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.state: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current state into the average (call after each optimizer step)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        floats = [k for k, v in self.state.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.state[k] for k in floats], [current[k].detach() for k in floats], 1.0 - decay)
        for k, v in self.state.items():
            if not v.is_floating_point():
                v.copy_(current[k])

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Within the block the model holds the averaged state; its own state is restored afterwards."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the average exactly."""
        return {"decay": self.decay, "updates": self.updates, "state": {k: v.cpu() for k, v in self.state.items()}}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore an average saved by `state_dict`."""
        self.decay, self.updates = float(saved["decay"]), int(saved["updates"])
        for k, v in saved["state"].items():
            self.state[k].copy_(v)
