"""Batched inference, one path for everything: metrics on a labelled set (`evaluate`), logits / probabilities /
pre-logit features (`predict`, and `predict_probs` for probabilities alone), and the training loop's evaluation
(`infer`). The served models (carsml.tracking.pyfunc_model / pyfunc_rf) call `predict` too."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
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

View = Callable[[Tensor], Tensor]  # uint8 N×3×H×W batch on the device -> the model's float input


@dataclass(frozen=True)
class Prediction:
    """What `predict` returns, rows in input order."""

    logits: np.ndarray  # (N, C) float32
    probs: np.ndarray  # (N, C) float32, softmax of logits
    features: np.ndarray | None = None  # (N, D) float32 pre-logit features; None unless asked for


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


def _forward(model: nn.Module, inputs: Tensor, features: bool) -> tuple[Tensor, Tensor | None]:
    """Logits, and with `features` the pre-logit features from the same pass (timm's interface, which ours share)."""
    if not features:
        return model(inputs), None
    hidden = model.forward_features(inputs)
    return model.forward_head(hidden), model.forward_head(hidden, pre_logits=True)


def infer(
    model: nn.Module,
    batches: Iterable[Tensor],
    transform: BatchTransform,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    features: bool = False,
    view: View | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The one inference loop, over uint8 N×3×H×W batches, model in eval mode, no augmentation: float32 logits (N, C)
    and, with `features`, float32 pre-logit features (N, D), both on `device`."""
    logits, hidden = [], []
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with eval_mode(model), torch.inference_mode():
        for x in batches:
            x = x.to(device, non_blocking=True)
            inputs = (view(x) if view is not None else transform(x, train=False)).contiguous(memory_format=layout)
            with autocast_context(device, amp_dtype):
                out, feats = _forward(model, inputs, features)
            logits.append(out.float())
            if feats is not None:
                hidden.append(feats.float().flatten(1))
    if not logits:
        raise DataError("inference: no images were given")
    return torch.cat(logits), torch.cat(hidden) if features else None


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
    if any(t.device != dev for t in itertools.chain(model.parameters(), model.buffers())):
        model.to(dev)
    if channels_last and any(p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last)
                             for p in model.parameters()):
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

    logits, _ = infer(model, images(), transform, device=dev, amp_dtype=amp_dtype, channels_last=channels_last)
    return metrics_from_logits(logits, torch.cat(labels).to(logits.device))


def _batches(
    images: Tensor | ArrayData, batch_size: int, device: torch.device, channels_last: bool
) -> Iterable[Tensor]:
    """uint8 N×3×H×W batches of a tensor or an `ArrayData`, in order; DataError for anything else or nothing."""
    if isinstance(images, ArrayData):
        if len(images) == 0:
            raise DataError("predict: the data set is empty")
        return (x for x, _ in iterate_batches(images, batch_size, shuffle=False, generator=None, device=device,
                                              channels_last=channels_last))
    if isinstance(images, Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
            raise DataError(f"predict: expected a non-empty uint8 (N, 3, H, W) tensor; got {images.dtype} "
                            f"{tuple(images.shape)}")
        return (images[i : i + batch_size] for i in range(0, images.shape[0], batch_size))
    raise DataError(f"predict: expected a uint8 tensor or ArrayData; got {type(images).__name__}")


def predict(
    model: nn.Module,
    images: Tensor | ArrayData,
    transform: BatchTransform | None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp: str = "auto",
    channels_last: bool = True,
    features: bool = False,
    view: View | None = None,
) -> Prediction:
    """Logits, probabilities and (with `features`) pre-logit features for a uint8 N×3×H×W tensor or an `ArrayData`,
    rows in input order; the inference path of evaluation, the served models and the experiments.

    Each batch goes through `transform(x, train=False)` (resize to the model's size, normalise), then the model in
    eval mode under `amp` (`autocast_dtype`: "auto" is bf16 on CPU; "off" is float32). `device` None keeps the model
    where it is. `features` runs `forward_features` once and `forward_head` twice on it (logits, and
    `pre_logits=True` for the features), as timm models and ours define them.

    `view`, when given, replaces `transform(x, train=False)` (pass `transform=None`): it gets each uint8 batch on the
    device and returns the model's float input, e.g. one test-time view: `lambda x: tf(x, train=True, generator=g)`
    or `lambda x: tf(x, train=False).flip(-1)`. It is called once per batch, in data order.
    """
    _check_batch_size(batch_size)
    if transform is None and view is None:
        raise ValueError("predict: give a transform or a view")
    dev = _prepare(model, device, channels_last)
    logits, feats = infer(model, _batches(images, batch_size, dev, channels_last), transform, device=dev,
                           amp_dtype=autocast_dtype(dev, amp), channels_last=channels_last, features=features,
                           view=view)
    return Prediction(
        logits=logits.cpu().numpy().astype(np.float32, copy=False),
        probs=torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32, copy=False),
        features=None if feats is None else feats.cpu().numpy().astype(np.float32, copy=False),
    )


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
    """Softmax probabilities (N, C) float32 for a uint8 N×3×H×W tensor or an `ArrayData`, in input order (`predict`).

    `device` None keeps the model where it is.
    """
    return predict(model, images_uint8, transform, batch_size=batch_size, device=device, amp=amp,
                   channels_last=channels_last).probs
