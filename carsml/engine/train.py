"""`fit`: the one training loop every model of the project goes through.

Its options and results (TrainConfig, FitState, FitResult) live in engine/types.py, the optimizer and the
learning-rate schedule in engine/optim.py, checkpoint files in engine/checkpoint.py.

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
    * under `torchrun` (engine/distributed.py) each process trains a DDP replica on its share of every global
      batch (`batch_size` is the global batch); train metrics are summed over the processes, rank 0 evaluates
      and its validation results drive every process's decisions; only rank 0 checkpoints and calls callbacks;
      when a callback stops rank 0's fit (e.g. a pruned trial), each replica's fit raises `distributed.Stopped`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carsml.data.transforms import BatchTransform
from carsml.engine import distributed
from carsml.engine.callbacks import Callback, CallbackList
from carsml.engine.checkpoint import (
    BEST_NAME,
    LAST_NAME,
    atomic_save,
    capture_rng,
    checkpoint_payload,
    cpu_state_dict,
    load_resume_checkpoint,
    restore_rng,
)
from carsml.engine.device import autocast_dtype, resolve_device, seed_everything
from carsml.engine.ema import WeightEMA
from carsml.engine.evaluate import EvalResult, autocast_context, infer, metrics_from_logits
from carsml.engine.loader import ArrayData, check_fit_labels, check_fit_splits, iterate_batches
from carsml.engine.optim import make_optimizer, make_scheduler, param_groups
from carsml.engine.types import FitResult, FitState, TrainConfig
from carsml.errors import CarsmlError, ConfigError, DataError

__all__ = ["fit", "is_better"]


def is_better(val_acc: float, val_loss: float, best_acc: float, best_loss: float) -> bool:
    """The model-selection rule: higher val accuracy, ties broken by lower val loss."""
    return val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss)


def _check_data(train: ArrayData, val: ArrayData | None, test: ArrayData | None, cfg: TrainConfig) -> None:
    check_fit_splits(train, val, test)
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
        self.world = distributed.world()
        distributed.check_config(cfg.batch_size, cfg.freeze_backbone_epochs, self.world)
        self.device = resolve_device(distributed.device_for(cfg.device, self.world))
        distributed.init(self.device)
        self.amp_dtype = autocast_dtype(self.device, cfg.amp)
        seed_everything(cfg.seed)
        # Own generators for data order and augmentation, so nothing else drawing random numbers shifts them.
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 1)

        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.num_classes = self._probe_num_classes()
        self.net = distributed.wrap(model, self.device)  # what trains: the model, or its DDP replica
        self.ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

        self.drop_last = len(train) >= cfg.batch_size
        self.steps_per_epoch = len(train) // cfg.batch_size if self.drop_last else 1
        self.backbone, groups = param_groups(model, cfg)
        self.trainable = {id(p): p.requires_grad for p in model.parameters()}  # restored after freezing
        self.optimizer = make_optimizer(cfg, groups)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.steps_per_epoch)
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
        logits, _ = infer(self.model, [x], self.eval_transform, device=self.device, amp_dtype=self.amp_dtype,
                          channels_last=self.cfg.channels_last)
        if logits.ndim != 2:
            raise DataError(
                f"fit: the model must return (N, num_classes) logits; got shape {tuple(logits.shape)}"
            )
        num_classes = logits.shape[1]
        check_fit_labels(num_classes, {"train": self.train, "val": self.val, "test": self.test})
        return num_classes

    def _checkpoint_payload(self, epoch: int) -> dict[str, Any]:
        # The best weights are stored separately only when they differ from the current ones (saves a copy).
        best = None if self.best_epoch == epoch else self.best_state
        return checkpoint_payload(
            epoch,
            self.cfg,
            self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            scaler=self.scaler.state_dict(),
            history=self.history,
            best_epoch=self.best_epoch,
            best_val_acc=self.best_acc,
            best_val_loss=self.best_loss,
            best_state_dict=best,
            epochs_without_improvement=self.epochs_without_improvement,
            stopped_early=self.stopped_early,
            rng=capture_rng(self._generators()),
            ema=self.ema.state_dict() if self.ema is not None else None,
        )

    def _generators(self) -> dict[str, torch.Generator]:
        return {"shuffle": self.shuffle_gen, "augment": self.aug_gen}

    def restore(self) -> None:
        """Continue from `checkpoint_dir/last.pt` (model, optimizer, schedules, counters, RNG states)."""
        if self.checkpoint_dir is None:
            raise ConfigError("fit: resume=True needs a checkpoint_dir")
        path = self.checkpoint_dir / LAST_NAME
        ckpt = load_resume_checkpoint(path, self.model, self.cfg)
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
            logits = self.net(x)
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
        self.net.train()
        if self.world.distributed:  # each process its own augmentation stream, a function of (seed, epoch, rank)
            self.aug_gen.manual_seed(self.cfg.seed + 1 + (epoch * self.world.size + self.world.rank) * 7919)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, window_loss, window_seen = 0, torch.zeros((), device=self.device), 0
        start = window_start = time.perf_counter()
        lrs: list[float] = []
        batches = iterate_batches(self.train, self.cfg.batch_size, shuffle=True, generator=self.shuffle_gen,
                                  device=self.device, drop_last=self.drop_last, channels_last=self.cfg.channels_last,
                                  share=(self.world.rank, self.world.size))
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
        loss_total, correct_total, seen_total = distributed.all_sum([float(loss_sum), float(correct), seen],
                                                                    self.device)
        return loss_total / seen_total, correct_total / seen_total, time.perf_counter() - start, lrs

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
            for x, y in iterate_batches(data, batch_size, shuffle=False, generator=None, device=self.device,
                                        channels_last=self.cfg.channels_last):
                labels.append(y)
                yield x

        logits, _ = infer(self.model, images(), self.eval_transform, device=self.device, amp_dtype=self.amp_dtype,
                          channels_last=self.cfg.channels_last)
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
        val = self._evaluate(self.val) if self.world.main else None  # rank 0 evaluates; every rank follows it
        val_loss, val_acc = distributed.from_main([val.loss, val.acc] if val else [0.0, 0.0], self.device)
        if not math.isfinite(val_loss):
            # An optimizer step can turn the weights NaN/inf after the train loss was computed (still finite);
            # the validation pass shows it. Without this check such a model could be selected as the best.
            raise self._diverged(
                f"val loss is {val_loss} after epoch {epoch} (train loss {train_loss:.4g}): the model no "
                "longer gives finite outputs"
            )
        metrics = self._epoch_metrics({"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                                       "val_acc": val_acc}, train_seconds, lrs, start)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_loss)
        if self.cfg.select_on == "val_loss":  # the same rule on (-loss, -acc): lower loss first, then higher accuracy
            better = is_better(-val_loss, -val_acc, -self.best_loss, -self.best_acc)
        else:
            better = is_better(val_acc, val_loss, self.best_acc, self.best_loss)
        if better:
            self.best_epoch, self.best_acc, self.best_loss = epoch, val_acc, val_loss
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
        if self.test is not None and self.world.main:
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
        if self.checkpoint_dir is None or not self.world.main:
            return
        if self.best_epoch == epoch:
            best = checkpoint_payload(epoch, self.cfg, self.best_state, val_acc=self.best_acc, val_loss=self.best_loss)
            atomic_save(best, self.checkpoint_dir / BEST_NAME)
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
    hooks = CallbackList(callbacks if distributed.world().main else ())  # under DDP rank 0 reports
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
            try:
                hooks.on_epoch_end(epoch, dict(metrics))
            except BaseException:
                distributed.stop_with_main(True, loop.device)  # the replicas stop with rank 0 (e.g. a pruned trial)
                raise
            if distributed.stop_with_main(False, loop.device):
                raise distributed.Stopped(f"rank 0 stopped the fit after epoch {epoch}")
        model.load_state_dict(loop.result().best_state_dict)
        result = loop.result()
        hooks.on_fit_end(result)
        return result
    except BaseException as error:
        hooks.fit_error(error)
        raise
