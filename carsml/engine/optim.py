"""Optimizer, parameter groups and learning-rate schedule of a fit, built from its TrainConfig.

    param_groups(model, cfg)          -> (backbone parameters, optimizer parameter groups)
    make_optimizer(cfg, groups)       -> Adam / AdamW / SGD (fused kernels), optionally without decay on 1-D parameters
    make_scheduler(cfg, optimizer, n) -> ReduceLROnPlateau, a per-step warmup + cosine LambdaLR, or None
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from carsml.engine.types import TrainConfig
from carsml.errors import ConfigError

FUSED_DEVICES = ("cpu", "cuda")  # where torch has fused Adam / AdamW / SGD kernels
Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def warmup_cosine_lr(
    step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Learning rate for 0-based optimizer step `step`.

    Linear warmup to base_lr over `warmup_steps` (the first step already at base_lr / warmup_steps), then
    cosine decay reaching min_lr after `total_steps` steps.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone params, head params), the head being `model.get_classifier()` (the timm convention)."""
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        raise ConfigError(
            f"TrainConfig.head_lr / freeze_backbone_epochs need a model with get_classifier() (as in timm); "
            f"{type(model).__name__} has none"
        )
    head = get_classifier()
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    if not head_ids:
        raise ConfigError(
            f"{type(model).__name__}.get_classifier() returned no parameters to train as the head"
        )
    params = list(model.parameters())
    return [p for p in params if id(p) not in head_ids], [p for p in params if id(p) in head_ids]


def param_groups(model: nn.Module, cfg: TrainConfig) -> tuple[list[nn.Parameter], list[dict[str, Any]]]:
    """(backbone parameters, optimizer groups): one group, or backbone + head (at head_lr) when the head is
    trained on its own terms (head_lr, freeze_backbone_epochs). The backbone list is empty with one group."""
    if cfg.head_lr is not None or cfg.freeze_backbone_epochs > 0:
        backbone, head = split_head(model)
        return backbone, [{"params": backbone}, {"params": head, "lr": cfg.head_lr or cfg.lr}]
    return [], [{"params": list(model.parameters())}]


def _without_norm_bias_decay(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As timm's create_optimizer_v2: biases and normalisation weights (every 1-D parameter) get no decay."""
    split = []
    for group in groups:
        decay = [p for p in group["params"] if p.ndim > 1]
        plain = [p for p in group["params"] if p.ndim <= 1]
        split += [g for g in ({**group, "params": decay}, {**group, "params": plain, "weight_decay": 0.0})
                  if g["params"]]
    return split


def fused(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused Adam / AdamW / SGD kernel can step these parameters: floating point, on CPU or CUDA.

    The fused kernel updates every tensor in one pass, where torch's default on CPU loops over the tensors, op by
    op. Same update rule; on 2 CPU cores an AdamW step of improved_cnn (96 px) drops from 103 to 12 ms, 18 % of its
    training step, and resnet18's from 32 to 6 ms (benchmarks/optimizer_step.py, docs/performance.md).
    """
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)


def make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """cfg.optimizer over `groups` at cfg.lr and cfg.weight_decay (none on 1-D parameters unless decay_norm_bias),
    with torch's fused kernel where the parameters allow it (`fused`)."""
    if not cfg.decay_norm_bias and cfg.weight_decay > 0:
        groups = _without_norm_bias_decay(groups)
    kernel = {"fused": True} if fused(groups) else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kernel)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler | None:
    """cfg.scheduler on `optimizer`: plateau (stepped on val loss per epoch), cosine (stepped per optimizer step,
    each group from its own lr) or None."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
        )
    if cfg.scheduler == "cosine":
        total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

        def factor(base: float) -> Any:
            return lambda step: (
                warmup_cosine_lr(
                    step, base_lr=base, min_lr=cfg.min_lr, warmup_steps=warmup, total_steps=total
                )
                / base
            )

        return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])
    return None
