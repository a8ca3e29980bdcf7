"""Study rows 4 and 7 — misclassification analysis of a trained model on the test (or validation) split
(the `errors` entry point).

Logs the full confusion matrix in a clustered order (confusable classes side by side) and a zoom on its most-confused
block, the most-confused class pairs by name, per-class accuracy / precision / recall, a gallery of misclassified images
each beside a training image of the class it was taken for, calibration (confidence histogram, reliability diagram,
`ece`) and how many errors stay inside one make / model (`errors_same_make_model_share`, `errors_year_only_share`, ...):
the fine-grained part of Stanford Cars. The numbers come from `analysis`, the model and its data from `source`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from carsml.data.classnames import relation
from carsml.engine.evaluate import EvalResult, evaluate
from carsml.engine.loader import ArrayData
from carsml.experiments.analysis import (
    calibration,
    cluster_order,
    confused_pairs,
    confusion_counts,
    fine_grained_shares,
    most_confused_block,
    per_class_table,
)
from carsml.experiments.common import check_positive
from carsml.experiments.source import SourceSplits, decode_analysed, eval_transform, prepare_analysis
from carsml.tracking import figures
from carsml.tracking.artifacts import log_confusion_matrix
from carsml.tracking.runs import log_csv, log_figure, log_metrics, setup_tracking, start_run


@dataclass
class ErrorReport:
    """What the errors entry point computed (also returned to Python callers)."""

    run_id: str
    split: str
    result: EvalResult
    metrics: dict[str, float]
    pairs: pd.DataFrame
    per_class: pd.DataFrame
    errors: pd.DataFrame
    order: np.ndarray


def run(cfg: dict[str, Any]) -> ErrorReport:
    """Analyse the mistakes of the model `cfg["run_id"]` on its test (or validation) split."""
    setup_tracking()
    split = cfg["split"]  # a choice checked by ErrorsOptions
    check_positive(cfg, "top_pairs", "gallery", "worst_classes", "zoom_classes", "calibration_bins")
    source, plan = prepare_analysis(cfg, split)
    names = plan.class_names
    with start_run(cfg["entry_point"], cfg, run_name=f"errors-{source.run.info.run_name}",
                   tags=source.tags()) as active:
        splits, data = decode_analysed(plan, split)
        result = evaluate(source.model, data, eval_transform(source.info), batch_size=int(cfg["batch_size"]),
                          device=cfg["device"], amp=cfg["amp"])
        counts = confusion_counts(result.labels, result.preds, len(names))
        metrics = {f"{split}_acc": result.acc, f"{split}_loss": result.loss, f"{split}_top5": result.top5,
                   f"{split}_macro_f1": result.macro_f1, f"{split}_images": float(len(result.labels)),
                   f"{split}_errors": float((result.preds != result.labels).sum())}
        order = _log_confusion(counts, names, split, int(cfg["zoom_classes"]))
        pairs = confused_pairs(counts, names, int(cfg["top_pairs"]))
        _log_pairs(pairs, split)
        per_class = per_class_table(counts, names)
        _log_per_class(per_class, int(cfg["worst_classes"]), split)
        errors = _error_table(result, splits.tables[split], names)
        log_csv(errors, f"tables/errors_{split}.csv")
        metrics.update(_log_calibration(result, int(cfg["calibration_bins"]), split))
        shares, relation_table = fine_grained_shares(counts, names)
        metrics.update(shares)
        log_csv(relation_table, "tables/error_relations.csv", as_table=True)
        _log_gallery(result, data, splits, names, int(cfg["gallery"]), int(cfg["seed"]), split)
        log_metrics(metrics)
        return ErrorReport(active.info.run_id, split, result, metrics, pairs, per_class, errors, order)


def _log_confusion(counts: np.ndarray, names: list[str], split: str, zoom: int) -> np.ndarray:
    order = cluster_order(counts)
    ordered_names = [names[i] for i in order]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    log_figure(figures.confusion_heatmap(rates[np.ix_(order, order)], ordered_names, hide_diagonal=True,
                                         title=f"Confusion ({split}, row-normalised, diagonal hidden), classes "
                                               f"ordered so confusable ones sit together"),
               f"figures/confusion_clustered_{split}.png")
    block = most_confused_block(counts, order, zoom)
    log_figure(figures.confusion_heatmap(counts[np.ix_(block, block)], [names[i] for i in block], annotate=True,
                                         title=f"Most-confused block of {len(block)} classes ({split}, image counts)"),
               f"figures/confusion_zoom_{split}.png")
    log_confusion_matrix(counts, names, split, None)  # the clustered heatmap above is this analysis's figure
    log_csv(pd.DataFrame(counts[np.ix_(order, order)], index=ordered_names, columns=ordered_names)
            .reset_index(names="true\\predicted"), f"tables/confusion_matrix_{split}_clustered.csv")
    return order


def _log_pairs(pairs: pd.DataFrame, split: str) -> None:
    log_csv(pairs, f"tables/confused_pairs_{split}.csv", as_table=True)
    if pairs.empty:
        return
    log_figure(figures.bar_chart(pairs["pair"].tolist(), pairs["count"].tolist(),
                                 f"Most-confused class pairs ({split}): true → predicted", "images",
                                 annotations=pairs["relation"].str.replace("_", " ").tolist()),
               f"figures/confused_pairs_{split}.png")


def _log_per_class(per_class: pd.DataFrame, worst: int, split: str) -> None:
    log_csv(per_class, f"tables/per_class_{split}.csv", as_table=True)
    rows = per_class[per_class["support"] > 0].sort_values(["accuracy", "f1"], kind="stable").head(worst)
    notes = [f"{r.correct}/{r.support}" + (f", often → {r.most_confused_with}" if r.most_confused_with else "")
             for r in rows.itertuples()]
    log_figure(figures.bar_chart(rows["class_name"].tolist(), rows["accuracy"].tolist(),
                                 f"Worst {len(rows)} classes ({split} accuracy)", "accuracy", annotations=notes,
                                 color="tab:orange"), f"figures/worst_classes_{split}.png")


def _error_table(result: EvalResult, rows: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    wrong = np.flatnonzero(result.preds != result.labels)
    true, pred = result.labels[wrong], result.preds[wrong]
    return pd.DataFrame({
        "position": wrong, "fname": rows["fname"].to_numpy()[wrong],
        "true_id": true, "true_class": [names[t] for t in true],
        "predicted_id": pred, "predicted_class": [names[p] for p in pred],
        "confidence": result.probs[wrong, pred], "true_class_probability": result.probs[wrong, true],
        "relation": [relation(names[t], names[p]) for t, p in zip(true, pred, strict=True)],
    }).sort_values("confidence", ascending=False, kind="stable")


def _log_calibration(result: EvalResult, bins: int, split: str) -> dict[str, float]:
    ece, table = calibration(result.probs, result.labels, bins)
    conf = result.probs.max(axis=1)
    correct = result.preds == result.labels
    log_csv(table, f"tables/calibration_{split}.csv")
    log_figure(figures.confidence_histogram(conf[correct], conf[~correct], f"Top-1 confidence ({split})"),
               f"figures/confidence_histogram_{split}.png")
    log_figure(figures.reliability_diagram(table, ece, f"Reliability diagram ({split}), ECE {ece:.3f}"),
               f"figures/reliability_diagram_{split}.png")
    nan = float("nan")
    return {"ece": ece, "mean_confidence": float(conf.mean()),
            "mean_confidence_correct": float(conf[correct].mean()) if correct.any() else nan,
            "mean_confidence_wrong": float(conf[~correct].mean()) if (~correct).any() else nan}


def gallery_picks(result: EvalResult, n: int) -> list[int]:
    """Positions of up to `n` misclassified images: the most confident mistakes, one per (true, predicted) pair
    first so one frequent confusion does not fill the gallery, then the next most confident ones."""
    wrong = np.flatnonzero(result.preds != result.labels)
    wrong = wrong[np.argsort(-result.probs[wrong, result.preds[wrong]], kind="stable")]
    seen, first, rest = set(), [], []
    for pos in wrong:
        pair = (int(result.labels[pos]), int(result.preds[pos]))
        (rest if pair in seen else first).append(int(pos))
        seen.add(pair)
    return (first + rest)[:n]


def _log_gallery(result: EvalResult, data: ArrayData, splits: SourceSplits, names: list[str], n: int, seed: int,
                 split: str) -> None:
    picks = gallery_picks(result, n)
    if not picks:
        return
    rng = np.random.default_rng(seed)
    train_labels = splits.train.targets
    images, _ = data.read(np.asarray(picks))
    items = []
    for image, pos in zip(images, picks, strict=True):
        pred = int(result.preds[pos])
        candidates = np.flatnonzero(train_labels == pred)
        example = splits.train.read(np.asarray([rng.choice(candidates)]))[0][0] if candidates.size else \
            np.zeros_like(image)
        items.append((image, example, names[int(result.labels[pos])], names[pred],
                      float(result.probs[pos, pred])))
    log_figure(figures.error_gallery(items, f"Misclassified {split} images (left) beside a training image of the "
                                            f"class they were taken for (right)"),
               f"figures/misclassified_gallery_{split}.png")
