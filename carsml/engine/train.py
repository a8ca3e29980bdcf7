"""`fit`: the one training loop every model of the project goes through.

Any `nn.Module` mapping float N×C×H×W to logits works. Conventions:
    * epochs are numbered from 1; `history[i]["epoch"] == i + 1`.
    * per-epoch metrics: train_loss train_acc val_loss val_acc [test_loss test_acc] lr [lr_head] epoch_seconds
      images_per_second. Train metrics come from the training forward passes (augmented, dropout on), as in
      the study. test_* are reported only — nothing is ever selected on them.
    * the best epoch is the one with the highest val accuracy, ties broken by the lower val loss
      (`select_on="val_loss"`: the lowest val loss, ties broken by the higher accuracy — steadier on a small
      validation split); early stopping counts epochs without such an improvement. At the end the model holds
      the best weights.
      Without a validation set (`val=None`: a refit on every training image for an epoch budget chosen
      earlier) nothing is selected: the last epoch is the result, and val_* metrics are absent.
    * with `ema_decay` > 0 an exponential moving average of the weights (engine/ema.py) is what is evaluated,
      selected and returned; training steps still update the raw weights.
    * train images may be larger than val / test images: the train transform produces the model's input
      size (a random crop then samples real pixels); val and test must share one size.
    * with `checkpoint_dir`, `last.pt` is rewritten atomically every epoch and `best.pt` whenever the best
      epoch changes; `resume=True` continues from `last.pt` and reproduces (on CPU, bit for bit) the history
      an uninterrupted fit would have produced.
    * train batches drop the last partial batch (a batch of 1 breaks BatchNorm), unless the whole train set
      is smaller than one batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carsml.data.transforms import BatchTransform
from carsml.engine.callbacks import Callback, CallbackList, FitState
from carsml.engine.checkpoint import (
    BEST_NAME,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LAST_NAME,
    atomic_save,
    capture_rng,
    check_compatible,
    cpu_state_dict,
    load_checkpoint,
    restore_rng,
)
from carsml.engine.device import AMP_CHOICES, autocast_dtype, resolve_device, seed_everything
from carsml.engine.ema import WeightEMA
from carsml.engine.evaluate import EvalResult, autocast_context, infer_logits, metrics_from_logits
from carsml.engine.loader import ArrayData, iterate_batches
from carsml.errors import CarsmlError, ConfigError, DataError

__all__ = ["Callback", "FitResult", "TrainConfig", "fit", "is_better", "warmup_cosine_lr"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "plateau", "cosine")
SELECT_ON = ("val_acc", "val_loss")
TIMING_KEYS = ("epoch_seconds", "images_per_second")  # the only history values that differ between runs
# Options a resumed fit may change; any other difference would make the resumed run a different experiment.
RESUME_MUTABLE = frozenset(
    {"epochs", "early_stopping_patience", "device", "eval_batch_size", "log_every_steps"}
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainConfig:
    """Everything `fit` needs besides the model and data. `validate()` before creating any run."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 5e-4
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    decay_norm_bias: bool = True  # False: no weight decay on biases and normalisation weights (timm's rule: 1-D)
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"  # none | plateau (ReduceLROnPlateau on val loss, the study's) | cosine (per step)
    warmup_epochs: int = 0  # linear warmup, cosine only
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    min_lr: float = 0.0  # floor for plateau and cosine
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # evaluate / select an exponential moving average of the weights; 0 = off, else in (0, 1)
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    early_stopping_patience: int = 0  # epochs without a better selected epoch; 0 = off
    select_on: str = "val_acc"  # val_acc (ties: lower loss) | val_loss (ties: higher accuracy)
    amp: str = "auto"  # auto | off | bf16 | fp16
    channels_last: bool = True
    device: str = "auto"
    seed: int = 42
    head_lr: float | None = None  # separate lr for model.get_classifier() parameters
    # Train only model.get_classifier() for the first N epochs (backbone parameters get no gradient; its
    # BatchNorm running statistics still adapt to the new data, the modules stay in train mode).
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


def is_better(val_acc: float, val_loss: float, best_acc: float, best_loss: float) -> bool:
    """The model-selection rule: higher val accuracy, ties broken by lower val loss."""
    return val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss)


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


# ---------------------------------------------------------------------------------------------- setup helpers
def _split_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
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


def _make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if not cfg.decay_norm_bias and cfg.weight_decay > 0:
        # as timm's create_optimizer_v2: biases and normalisation weights (every 1-D parameter) get no decay
        split = []
        for group in groups:
            decay = [p for p in group["params"] if p.ndim > 1]
            plain = [p for p in group["params"] if p.ndim <= 1]
            split += [g for g in ({**group, "params": decay}, {**group, "params": plain, "weight_decay": 0.0})
                      if g["params"]]
        groups = split
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _make_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None:
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


def _check_data(train: ArrayData, val: ArrayData | None, test: ArrayData | None, cfg: TrainConfig) -> None:
    for name, data in (("train", train), ("val", val), ("test", test)):
        if data is None and name != "train":
            continue
        if not isinstance(data, ArrayData):
            raise DataError(f"fit: {name} must be an ArrayData; got {type(data).__name__}")
        if len(data) == 0:
            raise DataError(f"fit: the {name} set is empty")
    shapes = {name: d.image_shape for name, d in (("val", val), ("test", test)) if d is not None}
    if len(set(shapes.values())) > 1:
        raise DataError(f"fit: val and test must have the same image size; got {shapes}")
    if val is None and (cfg.scheduler == "plateau" or cfg.early_stopping_patience > 0):
        raise ConfigError("fit: without a validation set (a refit) nothing can drive scheduler='plateau' or "
                          "early stopping; use scheduler 'cosine' or 'none' and early_stopping_patience=0")


# ---------------------------------------------------------------------------------------------- the loop
class _FitLoop:
    """State of one fit; methods are the steps of `fit`."""

    def __init__(
        self,
        model: nn.Module,
        train: ArrayData,
        val: ArrayData | None,
        test: ArrayData | None,
        cfg: TrainConfig,
        train_transform: BatchTransform,
        eval_transform: BatchTransform,
        callbacks: CallbackList,
        checkpoint_dir: Path | None,
    ) -> None:
        self.model, self.train, self.val, self.test, self.cfg = model, train, val, test, cfg
        self.train_transform, self.eval_transform, self.callbacks = train_transform, eval_transform, callbacks
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.device = resolve_device(cfg.device)
        self.amp_dtype = autocast_dtype(self.device, cfg.amp)
        seed_everything(cfg.seed)
        # Own generators for data order and augmentation, so nothing else drawing random numbers shifts them.
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 1)

        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.num_classes = self._probe_num_classes()
        self.ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

        self.drop_last = len(train) >= cfg.batch_size
        self.steps_per_epoch = len(train) // cfg.batch_size if self.drop_last else 1
        self.backbone: list[nn.Parameter] = []
        if cfg.head_lr is not None or cfg.freeze_backbone_epochs > 0:
            self.backbone, head = _split_head(model)
            groups = [{"params": self.backbone}, {"params": head, "lr": cfg.head_lr or cfg.lr}]
        else:
            groups = [{"params": list(model.parameters())}]
        self.trainable = {id(p): p.requires_grad for p in model.parameters()}  # restored after freezing
        self.optimizer = _make_optimizer(cfg, groups)
        self.scheduler = _make_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        # Loss scaling is only needed for float16 (bfloat16 has float32's exponent range).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.history: list[dict[str, float]] = []
        self.best_epoch, self.best_acc, self.best_loss = 0, -math.inf, math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.epochs_without_improvement = 0
        self.stopped_early = False

    # -- setup ---------------------------------------------------------------------------------------------
    def _probe_num_classes(self) -> int:
        """Run one evaluation image through the model to learn its number of classes (and fail early)."""
        probe = next(d for d in (self.val, self.test, self.train) if d is not None)
        x, _ = next(iterate_batches(probe, 1, shuffle=False, generator=None, device=self.device, prefetch=False))
        logits = infer_logits(
            self.model,
            [x],
            self.eval_transform,
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.cfg.channels_last,
        )
        if logits.ndim != 2:
            raise DataError(
                f"fit: the model must return (N, num_classes) logits; got shape {tuple(logits.shape)}"
            )
        num_classes = logits.shape[1]
        for name, data in (("train", self.train), ("val", self.val), ("test", self.test)):
            if data is not None and int(data.targets.max()) >= num_classes:
                raise DataError(
                    f"fit: the {name} labels go up to {int(data.targets.max())} but the model predicts "
                    f"{num_classes} classes"
                )
        return num_classes

    def _checkpoint_payload(self, epoch: int) -> dict[str, Any]:
        # The best weights are stored separately only when they differ from the current ones (saves a copy).
        best = None if self.best_epoch == epoch else self.best_state
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_val_acc": self.best_acc,
            "best_val_loss": self.best_loss,
            "best_state_dict": best,
            "epochs_without_improvement": self.epochs_without_improvement,
            "stopped_early": self.stopped_early,
            "rng": capture_rng(self._generators()),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def _generators(self) -> dict[str, torch.Generator]:
        return {"shuffle": self.shuffle_gen, "augment": self.aug_gen}

    def _check_resume_config(self, saved: dict[str, Any], path: Path) -> None:
        now = asdict(self.cfg)
        mutable = RESUME_MUTABLE - ({"epochs"} if self.cfg.scheduler == "cosine" else set())
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}"
            for k in (f.name for f in fields(TrainConfig))
            if k not in mutable and saved.get(k) != now[k]
        ]
        if diffs:
            raise CarsmlError(
                f"checkpoint {path}: written with other training options ({'; '.join(diffs)}); resume with "
                "the same options or start a new fit"
            )

    def restore(self) -> None:
        """Continue from `checkpoint_dir/last.pt` (model, optimizer, schedules, counters, RNG states)."""
        if self.checkpoint_dir is None:
            raise ConfigError("fit: resume=True needs a checkpoint_dir")
        path = self.checkpoint_dir / LAST_NAME
        ckpt = load_checkpoint(path)
        check_compatible(self.model, ckpt["model"], path)
        self._check_resume_config(ckpt["config"], path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.history = list(ckpt["history"])
        self.best_epoch, self.best_acc, self.best_loss = (
            ckpt["best_epoch"],
            ckpt["best_val_acc"],
            ckpt["best_val_loss"],
        )
        best = ckpt["best_state_dict"]
        self.best_state = best if best is not None else cpu_state_dict(self.model)
        self.epochs_without_improvement = ckpt["epochs_without_improvement"]
        self.stopped_early = ckpt["stopped_early"]
        restore_rng(ckpt["rng"], self._generators())
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])

    # -- one epoch -----------------------------------------------------------------------------------------
    def _freeze_backbone(self, frozen: bool) -> None:
        for p in self.backbone:
            p.requires_grad_(self.trainable[id(p)] and not frozen)

    def _train_step(self, x_u8: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step; returns (summed loss, number correct) as device tensors (no sync)."""
        cfg = self.cfg
        x = self.train_transform(x_u8, train=True, generator=self.aug_gen)
        target = y
        if self.train_transform.mixes:
            x, target = self.train_transform.mix(x, y, self.num_classes, generator=self.aug_gen)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.amp_dtype):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        # Accuracy against the hard labels, also under mixup (an approximation there, as usual).
        return loss.detach() * y.shape[0], (logits.detach().argmax(dim=1) == y).sum()

    def _train_epoch(self, epoch: int) -> tuple[float, float, float, list[float]]:
        """One pass over the train set: (loss, accuracy, seconds, learning rates of the last step)."""
        self._freeze_backbone(epoch <= self.cfg.freeze_backbone_epochs)
        try:
            return self._train_pass(epoch)
        finally:  # unfreeze even when the pass fails: the caller owns the model
            self._freeze_backbone(False)

    def _train_pass(self, epoch: int) -> tuple[float, float, float, list[float]]:
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, window_loss, window_seen = 0, torch.zeros((), device=self.device), 0
        start = window_start = time.perf_counter()
        lrs: list[float] = []
        batches = iterate_batches(
            self.train,
            self.cfg.batch_size,
            shuffle=True,
            generator=self.shuffle_gen,
            device=self.device,
            drop_last=self.drop_last,
            channels_last=self.cfg.channels_last,
        )
        for step, (x, y) in enumerate(batches, start=1):
            lrs = [g["lr"] for g in self.optimizer.param_groups]  # the rates this step uses
            batch_loss, batch_correct = self._train_step(x, y)
            if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
                self.scheduler.step()
            loss_sum += batch_loss
            correct += batch_correct
            window_loss += batch_loss
            seen += y.shape[0]
            window_seen += y.shape[0]
            # Checked every log_every_steps steps and always after the last step of the epoch, so a loss that
            # turns NaN/inf inside a window (it stays non-finite in the window's sum) is caught by the epoch's end.
            if step % self.cfg.log_every_steps == 0 or step == self.steps_per_epoch:
                mean_loss = float(window_loss) / window_seen  # the only host sync of the step loop
                if not math.isfinite(mean_loss):
                    raise self._diverged(f"train loss is {mean_loss} at epoch {epoch} step {step}")
                now = time.perf_counter()
                self.callbacks.on_batch_end(
                    epoch, step, self.steps_per_epoch, mean_loss, window_seen / max(now - window_start, 1e-9)
                )
                window_loss, window_seen, window_start = torch.zeros((), device=self.device), 0, now
        return float(loss_sum) / seen, float(correct) / seen, time.perf_counter() - start, lrs

    def _diverged(self, what: str) -> CarsmlError:
        return CarsmlError(
            f"training diverged: {what}; lower TrainConfig.lr (now {self.cfg.lr}"
            + (f", head_lr {self.cfg.head_lr}" if self.cfg.head_lr is not None else "")
            + ") or enable grad_clip"
        )

    def _evaluate(self, data: ArrayData) -> EvalResult:
        labels: list[Tensor] = []
        batch_size = self.cfg.eval_batch_size or self.cfg.batch_size

        def images() -> Iterator[Tensor]:
            for x, y in iterate_batches(
                data,
                batch_size,
                shuffle=False,
                generator=None,
                device=self.device,
                channels_last=self.cfg.channels_last,
            ):
                labels.append(y)
                yield x

        logits = infer_logits(
            self.model,
            images(),
            self.eval_transform,
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.cfg.channels_last,
        )
        return metrics_from_logits(logits, torch.cat(labels))

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train, evaluate, update best / early stopping / plateau; returns the epoch's metrics."""
        start = time.perf_counter()
        train_loss, train_acc, train_seconds, lrs = self._train_epoch(epoch)
        with self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext():
            return self._evaluate_and_select(epoch, train_loss, train_acc, train_seconds, lrs, start)

    def _evaluate_and_select(self, epoch: int, train_loss: float, train_acc: float, train_seconds: float,
                             lrs: list[float], start: float) -> dict[str, float]:
        """The epoch's evaluation (of the averaged weights with EMA) and the selection that follows it."""
        if self.val is None:
            return self._finish_epoch_without_val(epoch, train_loss, train_acc, train_seconds, lrs, start)
        val = self._evaluate(self.val)
        if not math.isfinite(val.loss):
            # An optimizer step can turn the weights NaN/inf after the train loss was computed (still finite);
            # the validation pass shows it. Without this check such a model could be selected as the best.
            raise self._diverged(
                f"val loss is {val.loss} after epoch {epoch} (train loss {train_loss:.4g}): the model no "
                "longer gives finite outputs"
            )
        metrics = self._epoch_metrics({"train_loss": train_loss, "train_acc": train_acc, "val_loss": val.loss,
                                       "val_acc": val.acc}, train_seconds, lrs, start)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val.loss)
        if self.cfg.select_on == "val_loss":  # the same rule on (-loss, -acc): lower loss first, then higher accuracy
            better = is_better(-val.loss, -val.acc, -self.best_loss, -self.best_acc)
        else:
            better = is_better(val.acc, val.loss, self.best_acc, self.best_loss)
        if better:
            self.best_epoch, self.best_acc, self.best_loss = epoch, val.acc, val.loss
            self.best_state = cpu_state_dict(self.model)
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        patience = self.cfg.early_stopping_patience
        self.stopped_early = patience > 0 and self.epochs_without_improvement >= patience
        return metrics

    def _epoch_metrics(self, metrics: dict[str, float], train_seconds: float, lrs: list[float],
                       start: float) -> dict[str, float]:
        """Add the (reported only) test metrics, learning rates and timings to an epoch's metrics."""
        if self.test is not None:
            test = self._evaluate(self.test)  # reported only, never used for any decision
            metrics.update(test_loss=test.loss, test_acc=test.acc)
        metrics["lr"] = lrs[0]
        if self.cfg.head_lr is not None:
            metrics["lr_head"] = lrs[1]
        metrics["epoch_seconds"] = time.perf_counter() - start
        metrics["images_per_second"] = self._train_images() / train_seconds
        return metrics

    def _finish_epoch_without_val(self, epoch: int, train_loss: float, train_acc: float, train_seconds: float,
                                  lrs: list[float], start: float) -> dict[str, float]:
        """A refit's epoch: nothing to select on, so the latest epoch is the result."""
        if not math.isfinite(train_loss):
            raise self._diverged(f"train loss is {train_loss} after epoch {epoch}")
        metrics = self._epoch_metrics({"train_loss": train_loss, "train_acc": train_acc}, train_seconds, lrs, start)
        self.best_epoch, self.best_acc, self.best_loss = epoch, math.nan, math.nan
        self.best_state = cpu_state_dict(self.model)
        return metrics

    def _train_images(self) -> int:
        return self.steps_per_epoch * self.cfg.batch_size if self.drop_last else len(self.train)

    def save(self, epoch: int) -> None:
        if self.checkpoint_dir is None:
            return
        if self.best_epoch == epoch:
            atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "epoch": epoch,
                    "config": asdict(self.cfg),
                    "model": self.best_state,
                    "val_acc": self.best_acc,
                    "val_loss": self.best_loss,
                },
                self.checkpoint_dir / BEST_NAME,
            )
        atomic_save(self._checkpoint_payload(epoch), self.checkpoint_dir / LAST_NAME)

    def state(self, resumed: bool) -> FitState:
        return FitState(
            cfg=self.cfg,
            device=self.device,
            amp_dtype=self.amp_dtype,
            num_classes=self.num_classes,
            num_train=len(self.train),
            num_val=len(self.val) if self.val is not None else 0,
            num_test=len(self.test) if self.test else 0,
            steps_per_epoch=self.steps_per_epoch,
            start_epoch=len(self.history) + 1,
            resumed=resumed,
        )

    def result(self) -> FitResult:
        assert self.best_state is not None
        return FitResult(
            best_epoch=self.best_epoch,
            best_val_acc=self.best_acc,
            best_val_loss=self.best_loss,
            history=[dict(h) for h in self.history],
            best_state_dict=self.best_state,
            epochs_run=len(self.history),
            train_seconds=sum(h["epoch_seconds"] for h in self.history),
            stopped_early=self.stopped_early,
        )


def fit(
    model: nn.Module,
    train: ArrayData,
    val: ArrayData | None,
    cfg: TrainConfig,
    *,
    train_transform: BatchTransform,
    eval_transform: BatchTransform,
    test: ArrayData | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> FitResult:
    """Train `model` on `train`, select the best epoch on `val` (None: keep the last); see the module docstring.

    Seeds everything with `cfg.seed` first (seed before building the model for reproducible initial weights
    too). Exceptions from callbacks propagate after `on_fit_error`; the checkpoint of the finished epoch is
    already on disk by then, so `resume=True` carries on after it.
    """
    cfg.validate()
    _check_data(train, val, test, cfg)
    if resume and checkpoint_dir is None:
        raise ConfigError("fit: resume=True needs a checkpoint_dir")
    hooks = CallbackList(callbacks)
    try:
        loop = _FitLoop(model, train, val, test, cfg, train_transform, eval_transform, hooks, checkpoint_dir)
        if resume:
            loop.restore()
        hooks.on_fit_start(loop.state(resumed=resume))
        if resume:
            hooks.on_resume([dict(h) for h in loop.history])
        for epoch in range(len(loop.history) + 1, cfg.epochs + 1):
            if loop.stopped_early:
                break
            metrics = loop.run_epoch(epoch)
            loop.history.append({"epoch": epoch, **metrics})
            loop.save(epoch)
            hooks.on_epoch_end(epoch, dict(metrics))
        model.load_state_dict(loop.result().best_state_dict)
        result = loop.result()
        hooks.on_fit_end(result)
        return result
    except BaseException as error:
        hooks.fit_error(error)
        raise
