"""Classification metrics on numpy arrays (no sklearn needed at training time)."""

from __future__ import annotations

import numpy as np

from carsml.errors import DataError


def _check(labels: np.ndarray, n: int, what: str) -> None:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"{what}: expected {n} labels in a 1-D array; got shape {labels.shape}")


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the labels (nan for no samples)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    _check(labels, preds.shape[0], "accuracy")
    return float(np.mean(preds == labels)) if labels.size else float("nan")


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Fraction of samples whose label is among the k highest scores (k capped at the number of classes)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    _check(labels, scores.shape[0], "topk_accuracy")
    if not labels.size:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur in labels or predictions (sklearn's "macro")."""
    preds, labels = np.asarray(preds, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    _check(labels, preds.shape[0], "macro_f1")
    if not labels.size:
        return float("nan")
    classes = np.union1d(labels, preds)
    size = int(classes.max()) + 1
    tp = np.bincount(labels[preds == labels], minlength=size)[classes]
    predicted = np.bincount(preds, minlength=size)[classes]
    actual = np.bincount(labels, minlength=size)[classes]
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + actual); the denominator is > 0 for every listed class.
    return float(np.mean(2.0 * tp / (predicted + actual)))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stability, returned as float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
