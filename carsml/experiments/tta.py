"""Study row 8 — test-time augmentation (TTA): N augmented views per test image, aggregated into one prediction.

Policies: `light` (default) — view 0 is the plain image, view 1 its mirror image, the others small horizontal crops
(95-100 % of the width, full height, at a random horizontal position, stretched back), every other one mirrored;
`study` — the training augmentation (flip, ±15° rotation, brightness / contrast jitter), as the study did.
Aggregations: `mean` (average of the softmax, default) and `vote` (majority of the views' top-1, as the study; ties go
to the higher mean probability). Both are always logged (`test_acc_tta_mean`, `test_acc_tta_vote`) next to
`test_acc_no_tta`; `aggregation` picks the headline `test_acc_tta` / `tta_delta` and the per-image table.

Each view of every image goes through the engine's one inference path (`engine.evaluate.predict`, `batch_size`
images per forward pass); each image draws its own random view parameters from one seeded generator, so a run is
reproducible.

The study's TTA lowered accuracy (45 % -> 20 %): 25 strongly augmented views with majority voting. The light views
are mild, and mild only where the data allows: each image is already cropped to its bounding box, so the box fixes the
car's vertical extent (roof to wheels) and a shift of one pixel up or down costs a bounding-box-trained CNN several
points, while small horizontal crops and mirroring cost nothing (measurements in docs/analysis.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carsml.data.transforms import build_transform, view_transform
from carsml.engine.device import resolve_device
from carsml.engine.evaluate import View, evaluate, predict
from carsml.engine.loader import ArrayData
from carsml.experiments.analysis import calibration
from carsml.experiments.common import check_positive
from carsml.experiments.source import decode_analysed, prepare_analysis
from carsml.tracking import figures
from carsml.tracking.runs import log_csv, log_figure, log_metrics, setup_tracking, start_run

LIGHT_MIN_WIDTH = 0.95  # light policy: crops keep at least 95 % of the width (and all of the height)

ViewFactory = Callable[[int, torch.Generator], View]  # view k of a policy: what `predict` applies to each batch


class LightViews:
    """The `light` TTA policy on uint8 N×C×H×W batches (carsml.data.transforms has no such policy).

    `views(x, n_views, generator)` -> float (n_views, N, C, H, W), normalised: view 0 the plain image, view 1 its
    mirror image, further views a per-image random crop of [LIGHT_MIN_WIDTH, 1] of the width (full height) at a
    random horizontal position, stretched back to the full width, odd views mirrored — one affine resampling per
    view for the whole batch.
    """

    def __init__(self, mean: Any, std: Any) -> None:
        self.plain = build_transform("none", mean=mean, std=std)

    def view(self, k: int, generator: torch.Generator | None = None) -> View:
        """View `k`: the uint8 batch -> its normalised view (0 plain, 1 mirrored, >= 2 a random crop)."""
        if k == 0:
            return lambda x: self.plain(x, train=False)
        if k == 1:
            return lambda x: self.plain(x, train=False).flip(-1)
        # odd views are mirrored: half the views each way, so the mean stays balanced between the two
        return lambda x: self._crop(self.plain(x, train=False), mirror=k % 2 == 1, generator=generator)

    def views(self, x: Tensor, n_views: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.stack([self.view(k, generator)(x) for k in range(n_views)])

    @staticmethod
    def _crop(x: Tensor, mirror: bool, generator: torch.Generator | None) -> Tensor:
        n = x.shape[0]
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand((n, 2), generator=generator, device=gen_device).to(x.device, x.dtype)
        width = LIGHT_MIN_WIDTH + (1.0 - LIGHT_MIN_WIDTH) * u[:, 0]
        theta = torch.zeros((n, 2, 3), device=x.device, dtype=x.dtype)
        # output (normalised coords in [-1, 1]) -> input: x_in = w * m * x_out + tx, y_in = y_out; |tx| <= 1 - w
        # keeps the crop inside the image, so no border is ever filled in
        theta[:, 0, 0], theta[:, 1, 1] = width * (-1.0 if mirror else 1.0), 1.0
        theta[:, 0, 2] = (2.0 * u[:, 1] - 1.0) * (1.0 - width)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def view_factory(policy: str, mean: Any, std: Any) -> ViewFactory:
    """`(k, generator) -> view k` of a policy, each view a function of a uint8 batch."""
    if policy == "light":
        return LightViews(mean, std).view
    study = view_transform("study", mean=mean, std=std)
    return lambda k, generator: (lambda x: study(x, train=True, generator=generator))


@dataclass
class TTAOutput:
    """Per-image results of test-time augmentation, rows in the data's order."""

    mean_probs: np.ndarray  # (N, C) mean softmax over the views
    votes: np.ndarray  # (N, C) how many views predicted each class
    view_preds: np.ndarray  # (V, N) top-1 of each view

    @property
    def mean_preds(self) -> np.ndarray:
        return self.mean_probs.argmax(axis=1)

    @property
    def vote_preds(self) -> np.ndarray:
        # majority; ties go to the higher mean probability (always < 1, so it never outweighs a whole vote)
        return (self.votes + 0.999 * self.mean_probs).argmax(axis=1)


def tta_predict(model: nn.Module, data: ArrayData, views: ViewFactory, n_views: int, *, batch_size: int,
                device: str, amp: str, generator: torch.Generator, channels_last: bool = True) -> TTAOutput:
    """Run `n_views` views of every image through `model` (the engine's `predict`, `batch_size` images per pass)."""
    probs = torch.from_numpy(np.stack([
        predict(model, data, None, batch_size=batch_size, device=resolve_device(device), amp=amp,
                channels_last=channels_last, view=views(k, generator)).probs
        for k in range(n_views)]))  # (V, N, C)
    top = probs.argmax(dim=2)
    votes = F.one_hot(top, probs.shape[2]).sum(dim=0)
    return TTAOutput(probs.mean(dim=0).numpy(), votes.numpy(), top.numpy())


@dataclass
class TTAResult:
    """What the tta entry point computed (also returned to Python callers)."""

    run_id: str
    metrics: dict[str, float]
    per_class: pd.DataFrame
    output: TTAOutput


def run(cfg: dict[str, Any]) -> TTAResult:
    """Test-time augmentation of the model `cfg["run_id"]` on its test (or validation) split."""
    setup_tracking()
    split, policy, aggregation = cfg["split"], cfg["policy"], cfg["aggregation"]  # choices checked by TtaOptions
    check_positive(cfg, "views")
    source, plan = prepare_analysis(cfg, split)
    names = plan.class_names
    with start_run(cfg["entry_point"], cfg, run_name=f"tta-{policy}-{aggregation}-{source.run.info.run_name}",
                   tags=source.tags()) as active:
        splits, data = decode_analysed(plan, split)
        model, info = source.model, source.info
        plain = evaluate(model, data, build_transform("none", mean=info["mean"], std=info["std"]),
                         batch_size=int(cfg["batch_size"]), device=cfg["device"], amp=cfg["amp"])
        generator = torch.Generator().manual_seed(int(cfg["seed"]))
        output = tta_predict(model, data, view_factory(policy, info["mean"], info["std"]), int(cfg["views"]),
                             batch_size=int(cfg["batch_size"]), device=cfg["device"], amp=cfg["amp"],
                             generator=generator)
        metrics = tta_metrics(plain.preds, plain.probs, output, plain.labels, split, aggregation)
        log_metrics(metrics)
        per_class = per_class_changes(plain.preds, output, plain.labels, names)
        log_csv(per_class, f"tables/tta_per_class_{split}.csv", as_table=True)
        chosen = output.mean_preds if aggregation == "mean" else output.vote_preds
        log_csv(pd.DataFrame({
            "fname": splits.tables[split]["fname"].to_numpy(), "label": plain.labels,
            "class_name": [names[t] for t in plain.labels], "pred_no_tta": plain.preds,
            "pred_tta_mean": output.mean_preds, "pred_tta_vote": output.vote_preds,
            "pred_tta": chosen, "vote_share": output.votes.max(axis=1) / output.view_preds.shape[0],
        }), f"tables/tta_predictions_{split}.csv")
        view_acc = (output.view_preds == plain.labels[None, :]).mean(axis=1)
        log_csv(pd.DataFrame({"view": np.arange(len(view_acc)), "accuracy": view_acc}), f"tables/tta_views_{split}.csv")
        log_figure(figures.tta_summary({"no TTA": plain.acc, "TTA mean": metrics[f"{split}_acc_tta_mean"],
                                        "TTA vote": metrics[f"{split}_acc_tta_vote"]}, view_acc,
                                       f"{cfg['views']} views, policy {policy} ({split})"),
                   f"figures/tta_summary_{split}.png")
        return TTAResult(active.info.run_id, metrics, per_class, output)


def tta_metrics(plain_preds: np.ndarray, plain_probs: np.ndarray, output: TTAOutput, labels: np.ndarray, split: str,
                aggregation: str) -> dict[str, float]:
    """Accuracy without TTA and with each aggregation, the deltas, calibration and how much the views agree."""
    acc = {"no_tta": float((plain_preds == labels).mean()),
           "tta_mean": float((output.mean_preds == labels).mean()),
           "tta_vote": float((output.vote_preds == labels).mean())}
    chosen = output.mean_preds if aggregation == "mean" else output.vote_preds
    fixed = int(((plain_preds != labels) & (chosen == labels)).sum())
    broken = int(((plain_preds == labels) & (chosen != labels)).sum())
    eps = 1e-12
    n_views = output.view_preds.shape[0]
    return {
        f"{split}_acc_no_tta": acc["no_tta"], f"{split}_acc_tta_mean": acc["tta_mean"],
        f"{split}_acc_tta_vote": acc["tta_vote"], f"{split}_acc_tta": acc[f"tta_{aggregation}"],
        "tta_delta_mean": acc["tta_mean"] - acc["no_tta"], "tta_delta_vote": acc["tta_vote"] - acc["no_tta"],
        "tta_delta": acc[f"tta_{aggregation}"] - acc["no_tta"],
        "tta_fixed": float(fixed), "tta_broken": float(broken), "tta_mcnemar_p": mcnemar_p(fixed, broken),
        f"{split}_loss_no_tta": float(-np.log(plain_probs[np.arange(len(labels)), labels] + eps).mean()),
        f"{split}_loss_tta_mean": float(-np.log(output.mean_probs[np.arange(len(labels)), labels] + eps).mean()),
        "ece_no_tta": calibration(plain_probs, labels, 15)[0],
        "ece_tta_mean": calibration(output.mean_probs, labels, 15)[0],
        "view_acc_mean": float((output.view_preds == labels[None, :]).mean()),
        "view_agreement": float((output.votes.max(axis=1) / n_views).mean()),
    }


def mcnemar_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value: how likely a split this uneven of the images TTA changed (fixed vs broken)
    is when TTA makes no difference. A small test set makes deltas of a few images noise; this says how much."""
    from scipy.stats import binomtest

    return float(binomtest(fixed, fixed + broken, 0.5).pvalue) if fixed + broken else 1.0


def per_class_changes(plain_preds: np.ndarray, output: TTAOutput, labels: np.ndarray,
                      class_names: list[str]) -> pd.DataFrame:
    """Per class: accuracy without TTA and with each aggregation, and the changes."""
    rows = []
    for cls, name in enumerate(class_names):
        mask = labels == cls
        if not mask.any():
            continue
        no_tta = float((plain_preds[mask] == cls).mean())
        mean = float((output.mean_preds[mask] == cls).mean())
        vote = float((output.vote_preds[mask] == cls).mean())
        rows.append({"class_id": cls, "class_name": name, "support": int(mask.sum()), "acc_no_tta": no_tta,
                     "acc_tta_mean": mean, "acc_tta_vote": vote, "delta_mean": mean - no_tta,
                     "delta_vote": vote - no_tta})
    return pd.DataFrame(rows).sort_values("delta_mean", kind="stable")
