"""MLflow pyfunc adapter (models-from-code) for a carsml backbone with a RandomForest head (study row 11).

Same input and output as `pyfunc_model.py` — a DataFrame with a `binary` column `image` of JPEG/PNG bytes (base64
in JSON) and an optional `box` column in; `label`, `class_id`, `score` (the forest's vote share), `top5_labels`,
`top5_scores` out — so clients and `mlflow models serve` treat both models alike, with the same decoder, box policy,
limits, formats and threads (the backbone runs through the engine's `predict` on the inference threads of
`CarsImageClassifier`).
Artifacts: "bundle" (the backbone, a carsml bundle) and "rf" (the RandomForest as a skops file, loaded with an explicit
allow-list of types).
"""

from __future__ import annotations

import mlflow
import numpy as np

from carsml.tracking.pyfunc_model import CarsImageClassifier

# What a fitted RandomForestClassifier holds beyond the types skops trusts by default.
SKOPS_TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]


class CarsRandomForestClassifier(CarsImageClassifier):
    """Backbone features (`forward_head(forward_features(x), pre_logits=True)`) → RandomForest → labels."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import skops.io

        super().load_context(context)
        self.rf = skops.io.load(context.artifacts["rf"], trusted=SKOPS_TRUSTED_TYPES)
        # the forest only has columns for classes it saw in training; map them onto all the model's classes
        self.rf_classes = np.asarray(self.rf.classes_, dtype=np.int64)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate-layer features (float32, N x D) for uint8 N x H x W x 3 images (on the inference threads)."""
        return self.run_batched(lambda part: self.infer(part, features=True).features, images)

    def features_and_probs(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (the forest's vote shares) over all the model's classes."""
        probs = np.zeros((len(images), len(self.class_names)), dtype=np.float64)
        probs[:, self.rf_classes] = self.rf.predict_proba(self.features(images))
        return probs


mlflow.models.set_model(CarsRandomForestClassifier())
