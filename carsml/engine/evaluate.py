"""Batched inference: metrics on a labelled set (`evaluate`) and class probabilities (`predict_probs`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carsml.data.transforms import BatchTransform
from carsml.engine.device import autocast_dtype, resolve_device
from carsml.engine.loader import ArrayData, iterate_batches
from carsml.engine.metrics import accuracy, macro_f1, topk_accuracy
from carsml.errors import ConfigError, DataError


@dataclass
class EvalResult:
    """Metrics and per-sample outputs on one labelled set, rows in the data's order.

    loss is the mean cross-entropy (no label smoothing); top5 is capped at the number of classes.
    """

    loss: float
    acc: float
    top5: float
    macro_f1: float
    logits: np.ndarray  # (N, C) float32
    probs: np.ndarray  # (N, C) float32, softmax of logits
    preds: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype`, or a no-op context for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def infer_logits(
    model: nn.Module,
    batches: Iterable[Tensor],
    transform: BatchTransform,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> Tensor:
    """Float32 logits (N, C) on `device` for uint8 NCHW batches, model in eval mode, no augmentation."""
    outputs = []
    with eval_mode(model), torch.inference_mode():
        for x in batches:
            inputs = transform(x.to(device, non_blocking=True), train=False)
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp_dtype):
                logits = model(inputs)
            outputs.append(logits.float())
    if not outputs:
        raise DataError("inference: no images were given")
    return torch.cat(outputs)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _prepare(model: nn.Module, device: torch.device | str | None, channels_last: bool) -> torch.device:
    dev = (
        _model_device(model)
        if device is None
        else (resolve_device(device) if isinstance(device, str) else torch.device(device))
    )
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return dev


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer; got {batch_size!r}")


def metrics_from_logits(logits: Tensor, labels: Tensor) -> EvalResult:
    """Loss, accuracy, top-5, macro F1 and per-sample arrays from float logits and int labels."""
    num_classes = logits.shape[1]
    if labels.numel() and int(labels.max()) >= num_classes:
        raise DataError(
            f"labels: the model predicts {num_classes} classes but a label is {int(labels.max())}"
        )
    loss = float(F.cross_entropy(logits, labels))
    logits_np = logits.cpu().numpy().astype(np.float32, copy=False)
    probs = torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32, copy=False)
    preds = logits_np.argmax(axis=1).astype(np.int64)
    labels_np = labels.cpu().numpy().astype(np.int64)
    return EvalResult(
        loss=loss,
        acc=accuracy(preds, labels_np),
        top5=topk_accuracy(logits_np, labels_np, 5),
        macro_f1=macro_f1(preds, labels_np),
        logits=logits_np,
        probs=probs,
        preds=preds,
        labels=labels_np,
    )


def evaluate(
    model: nn.Module,
    data: ArrayData,
    transform: BatchTransform,
    *,
    batch_size: int,
    device: torch.device | str,
    amp: str = "auto",
    channels_last: bool = True,
) -> EvalResult:
    """Evaluate `model` on `data` (eval mode, `transform` with train=False). Moves the model to `device`."""
    _check_batch_size(batch_size)
    if len(data) == 0:
        raise DataError("evaluate: the data set is empty")
    dev = _prepare(model, device, channels_last)
    amp_dtype = autocast_dtype(dev, amp)
    labels: list[Tensor] = []

    def images() -> Iterator[Tensor]:
        for x, y in iterate_batches(
            data, batch_size, shuffle=False, generator=None, device=dev, channels_last=channels_last
        ):
            labels.append(y)
            yield x

    logits = infer_logits(
        model, images(), transform, device=dev, amp_dtype=amp_dtype, channels_last=channels_last
    )
    return metrics_from_logits(logits, torch.cat(labels).to(logits.device))


def predict_probs(
    model: nn.Module,
    images_uint8: Tensor | ArrayData,
    transform: BatchTransform,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp: str = "auto",
    channels_last: bool = True,
) -> np.ndarray:
    """Softmax probabilities (N, C) float32 for a uint8 N×3×H×W tensor or an `ArrayData`, in input order.

    `device` None keeps the model where it is.
    """
    _check_batch_size(batch_size)
    dev = _prepare(model, device, channels_last)
    amp_dtype = autocast_dtype(dev, amp)
    if isinstance(images_uint8, ArrayData):
        if len(images_uint8) == 0:
            raise DataError("predict_probs: the data set is empty")
        batches: Iterable[Tensor] = (
            x
            for x, _ in iterate_batches(
                images_uint8,
                batch_size,
                shuffle=False,
                generator=None,
                device=dev,
                channels_last=channels_last,
            )
        )
    elif isinstance(images_uint8, Tensor):
        if images_uint8.ndim != 4 or images_uint8.shape[0] == 0:
            raise DataError(
                f"predict_probs: expected a non-empty (N, 3, H, W) tensor; got {tuple(images_uint8.shape)}"
            )
        batches = (images_uint8[i : i + batch_size] for i in range(0, images_uint8.shape[0], batch_size))
    else:
        raise DataError(
            f"predict_probs: expected a uint8 tensor or ArrayData; got {type(images_uint8).__name__}"
        )
    logits = infer_logits(
        model, batches, transform, device=dev, amp_dtype=amp_dtype, channels_last=channels_last
    )
    return torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32, copy=False)
