"""The served model sees exactly the training pixels: for the same image file (an RGB JPEG, a 16-bit PNG, a CMYK JPEG,
an EXIF-rotated JPEG), with and without a box, `mlflow.pyfunc.load_model(...).predict` of the logged model decodes the
same uint8 pixels as the training cache does for a dataset row with that file and box, and gives the same probabilities
as the engine's `predict` on them. It holds by construction (one decoder, one inference path, float32 on both sides),
so the tolerances are tight. Bad boxes are refused with a 400 naming the row. The features and views the RandomForest
model and TTA use come from the same inference path.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from carsml.data.cache import build_cache
from carsml.data.images import image_size
from carsml.data.transforms import build_transform
from carsml.engine import ArrayData, predict
from carsml.engine.evaluate import eval_mode
from carsml.models.factory import create_model, model_config, resolve_data_config
from carsml.tracking.models import BoxPolicy, log_model
from carsml.tracking.pyfunc_model import SERVE_AMP, SERVE_CHANNELS_LAST, decode_images
from tests.conftest import use_module_store

SIZE = 32
MARGIN = 0.1  # the model's crop_margin: the served box grows exactly as the training crop did
CLASS_NAMES = ["a", "b", "c"]
BOX = (30, 20, 170, 130)  # in a 200 x 150 image (displayed frame); a JPEG crop this size decodes at 1/2 scale
ROTATED_BOX = (20, 30, 130, 170)  # the same region of the EXIF-rotated file, as displayed (150 x 200)


def _pixels(seed: int) -> np.ndarray:
    """200 x 150 RGB: a gradient with noise, different per seed (so the images get different predictions)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 200)[None, :, None] * rng.uniform(0.3, 1.0, 3)
    return np.clip(ramp + rng.normal(0, 30, (150, 200, 3)), 0, 255).astype(np.uint8)


def write_images(folder: Path) -> dict[str, tuple[Path, tuple[int, int, int, int]]]:
    """The image files and each one's box: name -> (path, box)."""
    rgb = folder / "rgb.jpg"
    Image.fromarray(_pixels(0)).save(rgb, quality=90)
    gray16 = folder / "gray16.png"
    values = _pixels(1)[..., 0].astype(np.uint16) * 257 + np.arange(150, dtype=np.uint16)[:, None]
    Image.fromarray(values).save(gray16)
    cmyk = folder / "cmyk.jpg"
    Image.fromarray(_pixels(2)).convert("CMYK").save(cmyk, quality=90)
    rotated = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 200 x 150, shown 150 x 200
    Image.fromarray(_pixels(3)).save(rotated, quality=90, exif=exif)
    assert [Image.open(p).mode for p in (rgb, gray16, cmyk)] == ["RGB", "I;16", "CMYK"]
    assert image_size(rotated) == (150, 200)
    return {"rgb": (rgb, BOX), "gray16": (gray16, BOX), "cmyk": (cmyk, BOX), "rotated": (rotated, ROTATED_BOX)}


@pytest.fixture(scope="module")
def served(module_store: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny baseline CNN trained on box crops (use_boxes, crop_margin=MARGIN), logged to the module's store."""
    images = write_images(tmp_path_factory.mktemp("same-pixels"))
    model = create_model("baseline_cnn", num_classes=len(CLASS_NAMES), image_size=SIZE, head_widths=(32,), seed=0)
    data_cfg = resolve_data_config(model)
    info = {"model_config": model_config(model), "class_names": CLASS_NAMES, "image_size": SIZE,
            "mean": list(data_cfg["mean"]), "std": list(data_cfg["std"]), "use_boxes": True, "crop_margin": MARGIN}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", module_store)
        mlflow.set_tracking_uri(module_store)
        mlflow.set_experiment("same-pixels")  # not the experiment an earlier test of this worker left active
        with mlflow.start_run():
            uri = log_model(model, info, np.stack([_pixels(4)[:SIZE, :SIZE]] * 2))
        mlflow.set_tracking_uri(None)
    return {"uri": uri, "model": model, "info": info, "images": images}


@pytest.fixture(autouse=True)
def experiment(isolated: Path, module_store: str, monkeypatch: pytest.MonkeyPatch,
               request: pytest.FixtureRequest) -> str:
    return use_module_store(module_store, monkeypatch, request, "p-")


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def training_rows(images: dict[str, tuple[Path, tuple[int, int, int, int]]], with_box: bool) -> pd.DataFrame:
    """Dataset table rows for the files: their box, or the whole image (a class-folder dataset's box)."""
    rows = []
    for label, (path, box) in enumerate(images.values()):
        x1, y1, x2, y2 = box if with_box else (0, 0, *image_size(path))
        rows.append({"path": str(path), "label": label % len(CLASS_NAMES), "x1": x1, "y1": y1, "x2": x2, "y2": y2})
    return pd.DataFrame(rows)


def served_probs(out: pd.DataFrame) -> np.ndarray:
    """The full probability vectors of a pyfunc answer (3 classes: top-5 lists them all, rounded to 6 decimals)."""
    probs = np.zeros((len(out), len(CLASS_NAMES)))
    for i, (labels, scores) in enumerate(zip(out["top5_labels"], out["top5_scores"], strict=True)):
        probs[i, [CLASS_NAMES.index(label) for label in labels]] = scores
    return probs


@pytest.mark.parametrize("with_box", [True, False], ids=["box", "no-box"])
def test_served_model_sees_the_training_pixels_and_gives_the_engine_probabilities(
        served: dict[str, Any], cache_dir: Path, with_box: bool) -> None:
    images, info = served["images"], served["info"]
    # trained: the training cache's decode of dataset rows with these files (and boxes), then the engine's predict
    decoded = build_cache(training_rows(images, with_box), SIZE, cache_dir=cache_dir, use_boxes=info["use_boxes"],
                          margin=info["crop_margin"], workers=1)
    eval_tf = build_transform("none", size=SIZE, mean=info["mean"], std=info["std"])  # as fit_and_log evaluates
    trained = predict(served["model"], ArrayData(decoded.images, decoded.labels), eval_tf, amp=SERVE_AMP,
                      channels_last=SERVE_CHANNELS_LAST)
    # served: the logged model, base64 bytes of the same files (and the boxes)
    frame = pd.DataFrame({"image": [b64(path) for path, _ in images.values()]})
    if with_box:
        frame["box"] = [list(box) for _, box in images.values()]
    pyfunc = mlflow.pyfunc.load_model(served["uri"])
    out = pyfunc.predict(frame)

    classifier = pyfunc.unwrap_python_model()
    pixels = classifier.decode_frame(frame)
    for i, name in enumerate(images):
        assert np.array_equal(pixels[i], decoded.images[i]), f"{name}: served pixels differ from the training cache's"
    np.testing.assert_allclose(classifier.features_and_probs(pixels), trained.probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(served_probs(out), trained.probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["score"], trained.probs.max(axis=1), rtol=0, atol=1e-6)
    assert list(out["class_id"]) == list(trained.probs.argmax(axis=1))


def test_the_signature_is_mlflows_binary_image_and_array_outputs_and_base64_text_still_works(
        served: dict[str, Any]) -> None:
    """MLflow's conventions: `image` is a `binary` column (the scoring server hands the model bytes), top-5 are
    arrays; an in-process caller may pass bytes or the base64 text of older clients, with the same answer."""
    signature = mlflow.models.get_model_info(served["uri"]).signature
    assert signature.inputs.to_dict()[0] == {"type": "binary", "name": "image", "required": True}
    outputs = {col["name"]: col for col in signature.outputs.to_dict()}
    assert outputs["top5_labels"]["type"] == outputs["top5_scores"]["type"] == "array"
    assert (outputs["top5_labels"]["items"]["type"], outputs["top5_scores"]["items"]["type"]) == ("string", "double")
    paths = [path for path, _ in served["images"].values()]
    pyfunc = mlflow.pyfunc.load_model(served["uri"])
    as_bytes = pyfunc.predict(pd.DataFrame({"image": [path.read_bytes() for path in paths]}))
    as_text = pyfunc.predict(pd.DataFrame({"image": [b64(path) for path in paths]}))
    pd.testing.assert_frame_equal(as_bytes, as_text)
    assert isinstance(as_bytes["top5_labels"][0], list) and isinstance(as_bytes["top5_scores"][0][0], float)


def test_a_model_trained_on_whole_images_checks_a_box_but_decodes_the_whole_image(served: dict[str, Any]) -> None:
    images = served["images"]
    texts = [b64(path) for path, _ in images.values()]
    boxes = [list(box) for _, box in images.values()]
    whole = BoxPolicy(use_boxes=False, margin=MARGIN)
    assert np.array_equal(decode_images(texts, SIZE, boxes=boxes, policy=whole), decode_images(texts, SIZE))
    with pytest.raises(MlflowException, match=r"row 0: box \(300, 0, 400, 10\) lies outside the 200x150 image"):
        decode_images(texts[:1], SIZE, boxes=[[300, 0, 400, 10]], policy=whole)


BAD_BOXES = {
    "three numbers": ([1, 2, 3], "row 1: `box` must have 4 numbers, [x1, y1, x2, y2]"),
    "five numbers": ([1, 2, 3, 4, 5], "row 1: `box` must have 4 numbers"),
    "not numbers": (["a", 2, 3, 4], "row 1: `box` must be 4 whole numbers"),
    "fractional": ([1.5, 2, 30, 40], "row 1: `box` must be 4 whole numbers"),
    "a string": ("1,2,3,4", "row 1: `box` must be null or [x1, y1, x2, y2]"),
    "x2 before x1": ([50, 10, 40, 60], "row 1: `box` [50, 10, 40, 60] is empty: expected x1 < x2 and y1 < y2"),
    "zero height": ([10, 60, 50, 60], "row 1: `box` [10, 60, 50, 60] is empty"),
    "outside the JPEG": ([500, 400, 600, 500], "row 1: box (500, 400, 600, 500) lies outside the 200x150 image"),
}


@pytest.mark.parametrize("case", list(BAD_BOXES))
def test_a_bad_box_is_a_400_naming_the_row(served: dict[str, Any], case: str) -> None:
    box, fragment = BAD_BOXES[case]
    rgb = b64(served["images"]["rgb"][0])
    frame = pd.DataFrame({"image": [rgb, rgb], "box": [list(BOX), box]})
    with pytest.raises(MlflowException) as error:
        mlflow.pyfunc.load_model(served["uri"]).predict(frame)
    assert error.value.get_http_status_code() == 400
    message = error.value.message
    assert "1 of 2 row(s) have a bad `box` (row 1); the request was refused as a whole" in message, message
    assert fragment in message, message


def test_box_problems_found_when_decoding_and_mixed_with_image_problems_name_their_rows(
        served: dict[str, Any]) -> None:
    # a PNG without EXIF in its header: its orientation (and so the box's frame) is known once it is decoded
    png = b64(served["images"]["gray16"][0])
    with pytest.raises(MlflowException, match=r"1 of 2 row\(s\) have a bad `box` \(row 1\).*row 1: box "
                                              r"\(0, 200, 10, 210\) lies outside the 200x150 image"):
        decode_images([png, png], SIZE, boxes=[None, [0, 200, 10, 210]])
    with pytest.raises(MlflowException) as error:
        decode_images([png, "%%%", png], SIZE, boxes=[None, None, [3, 3, 3, 9]])
    assert "2 of 3 row(s) have a bad `image` or `box` (row 1, 2)" in error.value.message
    assert "row 1: `image` is not valid base64" in error.value.message
    assert "row 2: `box` [3, 3, 3, 9] is empty" in error.value.message


def test_features_and_views_go_through_the_same_inference_path(served: dict[str, Any]) -> None:
    """What the RandomForest model and TTA use: `predict(features=True)` gives the plain logits and the pre-logit
    features of the same forward pass; `view` replaces the transform, batch by batch."""
    model, info = served["model"], served["info"]
    images = torch.from_numpy(np.stack([_pixels(seed)[:SIZE, :SIZE] for seed in range(5)])).permute(0, 3, 1, 2)
    transform = build_transform("none", mean=info["mean"], std=info["std"])
    plain = predict(model, images, transform, batch_size=2, amp="off")
    both = predict(model, images, transform, batch_size=3, amp="off", features=True)
    assert plain.features is None and both.features.shape == (5, 32) and both.features.dtype == np.float32
    np.testing.assert_allclose(both.logits, plain.logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(both.probs, plain.probs, rtol=0, atol=1e-6)
    with eval_mode(model), torch.inference_mode():
        expected = model.forward_head(model.forward_features(transform(images, train=False)), pre_logits=True)
    np.testing.assert_allclose(both.features, expected.numpy(), rtol=0, atol=1e-5)
    same = predict(model, images, transform, amp="off", view=lambda x: transform(x, train=False))
    mirrored = predict(model, images, transform, amp="off", view=lambda x: transform(x.flip(-1), train=False))
    np.testing.assert_allclose(same.probs, plain.probs, rtol=0, atol=1e-6)
    assert not np.allclose(mirrored.logits, plain.logits, atol=1e-4)
