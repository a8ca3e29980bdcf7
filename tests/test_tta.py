"""tta (study row 8): test-time augmentation of the shared trained run — both aggregations logged next to the plain
accuracy and consistent with each other, the study's setting runs, bad options are refused — and the properties that
hold by construction: one view is the plain prediction, and mean-of-softmax over the plain and mirrored views cannot
change the prediction of a mirror-symmetric model.

Whether the light views *help* a trained model is an empirical claim that depends on the model (one retrained on another
CPU lost 3 of 120 images where this one gained 2): it is measured by benchmarks/tta_views.py over several seeds and
written to docs/analysis.md, not asserted here."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from carsml.cli import run_experiment
from carsml.data.transforms import build_transform
from carsml.engine.evaluate import evaluate
from carsml.engine.loader import ArrayData
from carsml.errors import ConfigError
from carsml.experiments.tta import LIGHT_MIN_WIDTH, LightViews, TTAOutput, mcnemar_p, tta_metrics, tta_predict
from carsml.models.factory import create_model

NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
PLAIN = build_transform("none", mean=NORM[0], std=NORM[1])

def _csv(run_id: str, path: str) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def test_default_tta_logs_both_aggregations_consistently(trained_run: str) -> None:
    result = run_experiment("tta", {"run_id": trained_run, "device": "cpu"})
    run = MlflowClient().get_run(result.run_id)
    m = run.data.metrics
    source = MlflowClient().get_run(trained_run).data.metrics
    n = len(result.output.mean_probs)
    assert run.info.status == "FINISHED" and run.data.tags["carsml.source_run_id"] == trained_run
    assert run.data.params["views"] == "25" and result.output.view_preds.shape == (25, n)
    assert m["test_acc_no_tta"] == pytest.approx(source["test_acc"], abs=1.5 / n)
    assert m["test_acc_tta"] == m["test_acc_tta_mean"]  # the default aggregation
    assert m["tta_delta_mean"] == pytest.approx(m["test_acc_tta_mean"] - m["test_acc_no_tta"])
    assert m["tta_delta_vote"] == pytest.approx(m["test_acc_tta_vote"] - m["test_acc_no_tta"])
    # the delta is exactly the images TTA fixed minus those it broke (counted from the logged predictions below)
    assert m["tta_fixed"] - m["tta_broken"] == pytest.approx(m["tta_delta"] * n)
    assert 0 < m["tta_mcnemar_p"] <= 1

    per_class = _csv(result.run_id, "tables/tta_per_class_test.csv")
    weights = per_class["support"] / per_class["support"].sum()
    assert (weights * per_class["acc_tta_mean"]).sum() == pytest.approx(m["test_acc_tta_mean"])
    assert (weights * per_class["acc_no_tta"]).sum() == pytest.approx(m["test_acc_no_tta"])
    assert per_class["delta_vote"].to_numpy() == pytest.approx(per_class["acc_tta_vote"] - per_class["acc_no_tta"])
    predictions = _csv(result.run_id, "tables/tta_predictions_test.csv")
    plain_ok = predictions["pred_no_tta"] == predictions["label"]
    tta_ok = predictions["pred_tta"] == predictions["label"]
    assert (m["tta_fixed"], m["tta_broken"]) == ((~plain_ok & tta_ok).sum(), (plain_ok & ~tta_ok).sum())
    assert (predictions["pred_tta"] == result.output.mean_preds).all()
    views = _csv(result.run_id, "tables/tta_views_test.csv")
    assert views.loc[0, "accuracy"] == pytest.approx(m["test_acc_no_tta"], abs=1.5 / n)  # view 0 is the plain image
    figures = {a.path for a in MlflowClient().list_artifacts(result.run_id, "figures")}
    assert "figures/tta_summary_test.png" in figures


def test_study_policy_with_majority_vote(trained_run: str) -> None:
    result = run_experiment("tta", {"run_id": trained_run, "device": "cpu", "policy": "study",
                                    "aggregation": "vote", "views": 5, "batch_size": 64})
    m = MlflowClient().get_run(result.run_id).data.metrics
    assert m["test_acc_tta"] == m["test_acc_tta_vote"] and m["tta_delta"] == m["tta_delta_vote"]
    assert result.output.votes.sum(axis=1).tolist() == [5] * len(result.output.votes)
    predictions = _csv(result.run_id, "tables/tta_predictions_test.csv")
    assert (predictions["pred_tta"] == predictions["pred_tta_vote"]).all()


def test_light_views_are_plain_mirror_then_small_horizontal_crops() -> None:
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    views = LightViews((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).views(x, 6, torch.Generator().manual_seed(0))
    plain = build_transform("none")(x, train=False)
    assert views.shape == (6, 3, 3, 32, 32)
    assert torch.equal(views[0], plain) and torch.equal(views[1], plain.flip(-1))
    # crops stay inside the image: every value is a blend of the image's own pixels (no black border fill)
    lo, hi = plain.amin(dim=(1, 2, 3)), plain.amax(dim=(1, 2, 3))
    assert (views.amin(dim=(2, 3, 4)) >= lo - 1e-5).all() and (views.amax(dim=(2, 3, 4)) <= hi + 1e-5).all()
    assert not torch.allclose(views[2], plain) and not torch.allclose(views[2], views[4])  # random, per view
    again = LightViews((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).views(x, 6, torch.Generator().manual_seed(0))
    assert torch.equal(views, again)
    # only the horizontal extent is cropped: an image that varies only from top to bottom looks the same in every view
    rows = torch.arange(32, dtype=torch.uint8).mul(8).view(1, 1, 32, 1).expand(2, 3, 32, 32).contiguous()
    row_views = LightViews((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).views(rows, 5, torch.Generator().manual_seed(1))
    assert torch.allclose(row_views, build_transform("none")(rows, train=False).expand_as(row_views), atol=1e-5)
    assert 0.5 < LIGHT_MIN_WIDTH < 1


class MirrorSymmetric(nn.Module):
    """f(x) = g(x) + g(mirror(x)): the same logits for an image and its mirror image, by construction."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.inner(x.flip(-1))


def _random_data(n: int = 24, classes: int = 4, seed: int = 0) -> ArrayData:
    rng = np.random.default_rng(seed)
    return ArrayData(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n))


def _tiny_model(model: str = "improved_cnn") -> nn.Module:
    torch.manual_seed(0)
    return create_model(model, 4, 32, head_widths=(16,)).eval()


def _tta(model: nn.Module, data: ArrayData, n_views: int, amp: str) -> TTAOutput:
    return tta_predict(model, data, LightViews(*NORM).view, n_views, batch_size=64, device="cpu", amp=amp,
                       generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_one_view_is_the_plain_prediction(amp: str) -> None:
    model, data = _tiny_model(), _random_data()
    plain = evaluate(model, data, PLAIN, batch_size=64, device="cpu", amp=amp)
    out = _tta(model, data, 1, amp)
    assert out.view_preds.shape == (1, len(data.labels))
    np.testing.assert_allclose(out.mean_probs, plain.probs, atol=1e-5)
    assert (out.mean_preds == plain.preds).all() and (out.vote_preds == plain.preds).all()


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_plain_and_mirror_views_cannot_change_a_mirror_symmetric_model(amp: str) -> None:
    # the light policy's first two views are the plain image and its mirror: on a model that cannot tell them apart,
    # mean-of-softmax TTA is guaranteed to keep every prediction, so it cannot lower (or raise) accuracy
    model, data = MirrorSymmetric(_tiny_model()).eval(), _random_data()
    plain = evaluate(model, data, PLAIN, batch_size=64, device="cpu", amp=amp)
    out = _tta(model, data, 2, amp)
    assert (out.view_preds[0] == out.view_preds[1]).all()
    np.testing.assert_allclose(out.mean_probs, plain.probs, atol=1e-5)
    assert (out.mean_preds == plain.preds).all()
    m = tta_metrics(plain.preds, plain.probs, out, data.labels, "test", "mean")
    assert m["tta_delta_mean"] == 0 and m["tta_fixed"] == m["tta_broken"] == 0 and m["view_agreement"] == 1


def test_mcnemar_p_value() -> None:
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == pytest.approx(1.0)
    assert mcnemar_p(10, 0) == pytest.approx(2 * 0.5**10)  # ten changes, all one way


def test_vote_ties_go_to_the_higher_mean_probability() -> None:
    out = TTAOutput(mean_probs=np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]),
                    votes=np.array([[2, 2, 0], [1, 2, 1]]), view_preds=np.zeros((4, 2), dtype=np.int64))
    assert out.vote_preds.tolist() == [1, 1] and out.mean_preds.tolist() == [1, 0]


@pytest.mark.parametrize("overrides, fragment", [
    ({"views": 0}, "'views': expected a positive integer"),
    ({"views": -3}, "'views': expected a positive integer"),
    ({"policy": "strong"}, "'policy': expected one of light, study"),
    ({"aggregation": "max"}, "'aggregation': expected one of mean, vote"),
    ({"amp": "fp8"}, "'amp': expected one of auto, off, bf16, fp16"),
    ({"device": "tpu"}, "device"),
])
def test_bad_options_are_refused_before_a_run(trained_run: str, overrides: dict, fragment: str) -> None:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    before = len(client.search_runs(experiments))
    with pytest.raises(ConfigError, match=fragment):
        run_experiment("tta", {"run_id": trained_run, **overrides})
    assert len(client.search_runs(experiments)) == before
