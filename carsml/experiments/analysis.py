"""The numbers of the misclassification analysis: confusion counts and their clustered order, the most-confused
pairs and block, per-class precision / recall, calibration (ECE and the reliability table), and how many errors stay
inside one make / model. Plain numpy / pandas on predictions: no model, no MLflow."""

from __future__ import annotations

import numpy as np
import pandas as pd

from carsml.data.classnames import RELATIONS, relation, relation_matrix


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[float, pd.DataFrame]:
    """Expected calibration error (top-label, equal-width bins) and the per-bin table behind the reliability
    diagram: ECE = sum over bins of (images in bin / N) * |accuracy - mean confidence|."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi] bins, 0 in the first
    rows, ece = [], 0.0
    for b in range(bins):
        in_bin = which == b
        count = int(in_bin.sum())
        acc = float(correct[in_bin].mean()) if count else 0.0
        mean_conf = float(conf[in_bin].mean()) if count else 0.0
        ece += count / max(len(labels), 1) * abs(acc - mean_conf)
        rows.append({"lo": edges[b], "hi": edges[b + 1], "count": count, "confidence": mean_conf, "accuracy": acc})
    return float(ece), pd.DataFrame(rows)


def confusion_counts(labels: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts, rows = true class, columns = predicted class."""
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (labels, preds), 1)
    return counts


def cluster_order(counts: np.ndarray) -> np.ndarray:
    """Class order that puts classes confused with each other next to each other: the leaf order of an
    average-linkage clustering on 1 - symmetrised row-normalised confusion (optimal leaf ordering)."""
    n = counts.shape[0]
    if n < 3:
        return np.arange(n)
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    np.fill_diagonal(rates, 0.0)
    similarity = (rates + rates.T) / 2
    distance = 1.0 - similarity / max(similarity.max(), 1e-12)
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance, checks=False)
    tree = linkage(condensed, method="average")
    return leaves_list(optimal_leaf_ordering(tree, condensed))


def most_confused_block(counts: np.ndarray, order: np.ndarray, size: int) -> np.ndarray:
    """The `size` consecutive classes (in `order`) holding the most confusions among themselves."""
    n = len(order)
    size = min(size, n)
    ordered = counts[np.ix_(order, order)].astype(float)
    np.fill_diagonal(ordered, 0)
    ordered = ordered + ordered.T
    best, best_start = -1.0, 0
    for start in range(n - size + 1):
        mass = ordered[start:start + size, start:start + size].sum()
        if mass > best:
            best, best_start = mass, start
    return order[best_start:best_start + size]


def confused_pairs(counts: np.ndarray, class_names: list[str], top: int) -> pd.DataFrame:
    """The `top` most frequent (true -> predicted) errors with names, counts and how the two classes relate."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top]
    rows = []
    for true, pred in zip(*np.unravel_index(flat, off.shape), strict=True):
        if off[true, pred] == 0:
            break
        support = int(counts[true].sum())
        rows.append({"true_id": int(true), "true_class": class_names[true], "predicted_id": int(pred),
                     "predicted_class": class_names[pred], "count": int(off[true, pred]),
                     "share_of_true_class": off[true, pred] / max(support, 1),
                     "relation": relation(class_names[true], class_names[pred]),
                     "pair": f"{class_names[true]} → {class_names[pred]}"})
    return pd.DataFrame(rows, columns=["true_id", "true_class", "predicted_id", "predicted_class", "count",
                                       "share_of_true_class", "relation", "pair"])


def per_class_table(counts: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Per class: support, correct, accuracy (= recall), precision, F1 and the class it is most often taken for."""
    support = counts.sum(axis=1)
    predicted = counts.sum(axis=0)
    correct = np.diag(counts)
    recall = np.divide(correct, support, out=np.zeros(len(support)), where=support > 0)
    precision = np.divide(correct, predicted, out=np.zeros(len(support)), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(support)),
                   where=(precision + recall) > 0)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    top = off.argmax(axis=1)
    return pd.DataFrame({
        "class_id": np.arange(len(class_names)), "class_name": class_names, "support": support,
        "correct": correct, "accuracy": recall, "precision": precision, "recall": recall, "f1": f1,
        "most_confused_with": [class_names[t] if off[i, t] else "" for i, t in enumerate(top)],
        "most_confused_count": off[np.arange(len(top)), top],
    })


def fine_grained_shares(counts: np.ndarray, class_names: list[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """Share of the errors that stay inside a make / model (and, for comparison, the share of all class pairs)."""
    rel = relation_matrix(class_names)
    off = counts.astype(float).copy()
    np.fill_diagonal(off, 0)
    n_errors = off.sum()
    n = len(class_names)
    pairs = max(n * (n - 1), 1)
    rows, metrics = [], {}
    for i, name in enumerate(RELATIONS):
        mask = rel == i
        np.fill_diagonal(mask, False)
        errors = float(off[mask].sum())
        rows.append({"relation": name, "errors": int(errors), "share_of_errors": errors / n_errors if n_errors else 0,
                     "share_of_class_pairs": mask.sum() / pairs})
    table = pd.DataFrame(rows)
    share = dict(zip(table["relation"], table["share_of_errors"], strict=True))
    pair_share = dict(zip(table["relation"], table["share_of_class_pairs"], strict=True))
    within_model = ("year_only", "body_only", "same_make_model")
    metrics["errors_year_only_share"] = share["year_only"]
    metrics["errors_body_only_share"] = share["body_only"]
    metrics["errors_same_make_model_share"] = sum(share[r] for r in within_model)
    metrics["errors_same_model_line_share"] = metrics["errors_same_make_model_share"] + share["same_model_line"]
    metrics["errors_same_make_share"] = metrics["errors_same_model_line_share"] + share["same_make"]
    # the same shares for a classifier that erred uniformly at random: how much the errors concentrate
    metrics["chance_same_make_model_share"] = sum(pair_share[r] for r in within_model)
    metrics["chance_same_make_share"] = 1.0 - pair_share["other"]
    return metrics, table
