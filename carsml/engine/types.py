"""The engine's plain data types, shared by its modules: what a fit is told (TrainConfig), what it is about to do
(FitState, given to callbacks) and what it returns (FitResult). Nothing here imports the loop, so train.py,
callbacks.py, optim.py and checkpoint.py all import from here and never from each other for these types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from carsml.engine.device import AMP_CHOICES, resolve_device
from carsml.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "plateau", "cosine")
SELECT_ON = ("val_acc", "val_loss")
TIMING_KEYS = ("epoch_seconds", "images_per_second")  # the only history values that differ between runs


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainConfig:
    """Everything `fit` needs besides the model and data. `validate()` before creating any run.

    The fields without a default are training options: their defaults live once, in the training entry points' YAML
    (`carsml/experiments/defaults/_train.yaml`), and `carsml.experiments.train.train_config` builds a TrainConfig from
    a resolved config. The fields with a default are the engine's own knobs, which no entry point changes.
    """

    epochs: int
    batch_size: int
    lr: float
    optimizer: str  # adam | adamw | sgd
    weight_decay: float
    decay_norm_bias: bool  # False: no weight decay on biases and normalisation weights (timm's rule: 1-D)
    scheduler: str  # none | plateau (ReduceLROnPlateau on val loss, the study's) | cosine (per step)
    warmup_epochs: int  # linear warmup, cosine only
    plateau_factor: float
    plateau_patience: int
    label_smoothing: float
    ema_decay: float  # evaluate / select an exponential moving average of the weights; 0 = off, else in (0, 1)
    grad_clip: float  # max global gradient norm; 0 = off
    early_stopping_patience: int  # epochs without a better selected epoch; 0 = off
    select_on: str  # val_acc (ties: lower loss) | val_loss (ties: higher accuracy)
    amp: str  # auto | off | bf16 | fp16
    channels_last: bool
    device: str
    seed: int
    momentum: float = 0.9  # sgd only
    min_lr: float = 0.0  # floor for plateau and cosine
    head_lr: float | None = None  # separate lr for model.get_classifier() parameters (transfer's option)
    # Train only model.get_classifier() for the first N epochs (backbone parameters get no gradient; its
    # BatchNorm running statistics still adapt to the new data, the modules stay in train mode). Transfer's option.
    freeze_backbone_epochs: int = 0
    eval_batch_size: int | None = None  # defaults to batch_size
    log_every_steps: int = 10  # on_batch_end cadence (each call syncs the device once)

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid field, its value and what was expected."""

        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{name}: expected {expected}; got {getattr(self, name)!r}")

        for name in ("epochs", "batch_size", "log_every_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        for name in (
            "warmup_epochs",
            "plateau_patience",
            "early_stopping_patience",
            "freeze_backbone_epochs",
        ):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        if not _is_number(self.lr) or self.lr <= 0:
            raise bad("lr", "a positive number")
        if self.head_lr is not None and (not _is_number(self.head_lr) or self.head_lr <= 0):
            raise bad("head_lr", "a positive number or None")
        for name in ("weight_decay", "min_lr", "grad_clip"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a number >= 0")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise bad("momentum", "a number in [0, 1)")
        if not _is_number(self.plateau_factor) or not 0 < self.plateau_factor < 1:
            raise bad("plateau_factor", "a number in (0, 1)")
        if not _is_number(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "a number in [0, 1)")
        if not _is_number(self.ema_decay) or not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise bad("ema_decay", "0 (off) or a number in (0, 1), e.g. 0.998")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"one of {', '.join(SCHEDULERS)}")
        if self.select_on not in SELECT_ON:
            raise bad("select_on", f"one of {', '.join(SELECT_ON)}")
        if self.amp not in AMP_CHOICES:
            raise bad("amp", f"one of {', '.join(AMP_CHOICES)}")
        if self.warmup_epochs and self.scheduler != "cosine":
            raise bad("warmup_epochs", f"0 unless scheduler is 'cosine' (scheduler is {self.scheduler!r})")
        if self.scheduler == "cosine" and self.warmup_epochs >= self.epochs:
            raise bad("warmup_epochs", f"fewer than epochs ({self.epochs}) with the cosine schedule")
        if self.min_lr > min(self.lr, self.head_lr or self.lr):
            raise bad("min_lr", "at most lr and head_lr")
        if self.freeze_backbone_epochs > self.epochs:
            raise bad("freeze_backbone_epochs", f"at most epochs ({self.epochs})")
        if self.eval_batch_size is not None and (
            not _is_int(self.eval_batch_size) or self.eval_batch_size < 1
        ):
            raise bad("eval_batch_size", "a positive integer or None")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        for name in ("channels_last", "decay_norm_bias"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        resolve_device(self.device)  # unknown or unavailable device → ConfigError now, not mid-run


@dataclass
class FitResult:
    """The outcome of `fit`. `history` holds one metrics dict per epoch run (with an "epoch" key)."""

    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    history: list[dict[str, float]]
    best_state_dict: dict[str, Tensor] = field(repr=False)
    epochs_run: int  # epochs trained in total, including any before a resume
    train_seconds: float  # sum of epoch_seconds over all epochs
    stopped_early: bool


@dataclass
class FitState:
    """What a fit is about to do (given to `Callback.on_fit_start`)."""

    cfg: TrainConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    num_classes: int
    num_train: int
    num_val: int
    num_test: int  # 0 without a test set
    steps_per_epoch: int
    start_epoch: int  # 1 for a fresh fit; the first epoch still to run when resuming
    resumed: bool
