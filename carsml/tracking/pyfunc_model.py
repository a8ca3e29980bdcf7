"""MLflow pyfunc adapter (models-from-code): base64 images in, labels and top-5 out.

Input: a DataFrame with a string column `image` holding base64-encoded JPEG/PNG bytes (clients send `dataframe_split`).
Output per row: `label`, `class_id` (0-based), `score`, and `top5_labels` / `top5_scores` (JSON lists).
Bad rows raise MlflowException(INVALID_PARAMETER_VALUE), which `mlflow models serve` answers with HTTP 400: every row
is checked first, and one bad row refuses the whole request with a message naming every bad row (never a partial
answer). The whole frame is predicted as one batch. Images larger than MAX_IMAGE_BYTES or MAX_PIXELS are refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # per image, decoded from base64
MAX_PIXELS = 40_000_000  # width x height
MAX_ROWS_DESCRIBED = 10  # bad rows whose problem a refusal spells out (all bad row indexes are listed)


def decode_image(text: object, row: int, size: int) -> np.ndarray:
    """Base64 text → RGB uint8 array resized to size x size; clear errors naming the row."""
    if not isinstance(text, str) or not text:
        raise MlflowException.invalid_parameter_value(f"row {row}: `image` must be a non-empty base64 string")
    if len(text) * 3 // 4 > MAX_IMAGE_BYTES:
        raise MlflowException.invalid_parameter_value(
            f"row {row}: image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MlflowException.invalid_parameter_value(f"row {row}: `image` is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise MlflowException.invalid_parameter_value(
                    f"row {row}: image is {img.width}x{img.height}, more than {MAX_PIXELS:,} pixels")
            from PIL import ImageOps

            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            elif img.mode.startswith("I") or img.mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(arr / max(arr.max(), 1) * 255, 0, 255).astype(np.uint8))
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(img)
    except Image.DecompressionBombError:  # PIL refuses > 2 x its own limit before our size check can run
        raise MlflowException.invalid_parameter_value(
            f"row {row}: image has more than {MAX_PIXELS:,} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise MlflowException.invalid_parameter_value(
            f"row {row}: `image` bytes are not a readable JPEG/PNG image") from None


def decode_images(values: pd.Series | list[object], size: int) -> np.ndarray:
    """Decode every row with `decode_image` into one N x size x size x 3 batch.

    All rows are checked before anything is predicted: when any is bad, the whole request is refused with one
    MlflowException(INVALID_PARAMETER_VALUE) naming every bad row index and what is wrong with (the first
    MAX_ROWS_DESCRIBED of) them.
    """
    images, problems = [], {}
    for row, value in enumerate(values):
        try:
            images.append(decode_image(value, row, size))
        except MlflowException as exc:
            problems[row] = exc.message
    if problems:
        bad = list(problems)
        listed = ", ".join(map(str, bad[:100])) + (", ..." if len(bad) > 100 else "")
        details = "; ".join(problems[row] for row in bad[:MAX_ROWS_DESCRIBED])
        if len(bad) > MAX_ROWS_DESCRIBED:
            details += f"; ... ({len(bad) - MAX_ROWS_DESCRIBED} more)"
        raise MlflowException.invalid_parameter_value(
            f"{len(bad)} of {len(images) + len(bad)} row(s) have a bad `image` (row {listed}); the request was "
            f"refused as a whole, nothing was predicted: {details}")
    return np.stack(images)


class CarsImageClassifier(mlflow.pyfunc.PythonModel):
    """Serves a carsml network (bundle artifact) — predictions for a batch of base64 images."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from carsml.data.transforms import build_transform
        from carsml.tracking.models import load_bundle

        self.model, self.info = load_bundle(context.artifacts["bundle"])
        self.class_names = self.info["class_names"]
        self.size = int(self.info["image_size"])
        self.transform = build_transform("none", mean=self.info["mean"], std=self.info["std"])

    def features_and_probs(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities for uint8 N x H x W x 3 images."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            logits = self.model(self.transform(x, train=False))
        return torch.softmax(logits.float(), dim=1).numpy()

    def decode_frame(self, model_input: pd.DataFrame) -> np.ndarray:
        """Validate the request frame and decode its images into one batch."""
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise MlflowException.invalid_parameter_value("input must be a DataFrame with a string column `image`")
        if len(model_input) == 0:
            raise MlflowException.invalid_parameter_value("input frame is empty: send at least one row")
        return decode_images(model_input["image"], self.size)

    def format(self, probs: np.ndarray) -> pd.DataFrame:
        """Rows of label / class_id / score / top-5 from probabilities."""
        top = np.argsort(-probs, axis=1, kind="stable")[:, :5]  # ties (forest vote shares) -> lowest class id
        return pd.DataFrame({
            "label": [self.class_names[t[0]] for t in top],
            "class_id": top[:, 0].astype(np.int64),
            "score": probs[np.arange(len(probs)), top[:, 0]].astype(np.float64),
            "top5_labels": [json.dumps([self.class_names[j] for j in t]) for t in top],
            "top5_scores": [json.dumps([round(float(p[j]), 6) for j in t]) for p, t in zip(probs, top, strict=True)],
        })

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        return self.format(self.features_and_probs(self.decode_frame(model_input)))


mlflow.models.set_model(CarsImageClassifier())
