"""Logging the RandomForest of features_rf: the forest alone (an sklearn model, features in) and the forest with its
backbone as one image -> label pyfunc (`pyfunc_rf.py`, served like the network itself)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import infer_signature
from sklearn.ensemble import RandomForestClassifier
from torch import nn

from carsml.errors import CarsmlError
from carsml.tracking import tags as tag
from carsml.tracking.models import log_model, logged_model_name
from carsml.tracking.pyfunc_rf import SKOPS_TRUSTED_TYPES

RF_PYFUNC_FILE = Path(__file__).with_name("pyfunc_rf.py")


def log_rf_head(rf: RandomForestClassifier, example: np.ndarray) -> str:
    """Log the forest alone (features in, class out) as an sklearn model in skops format; tag carsml.rf_head_uri."""
    run_tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags
    logged = mlflow.sklearn.log_model(rf, name=logged_model_name(run_tags, "rf_head"), serialization_format="skops",
                                      skops_trusted_types=SKOPS_TRUSTED_TYPES,
                                      signature=infer_signature(example, rf.predict(example)), input_example=example)
    mlflow.set_tag(tag.RF_HEAD_URI, logged.model_uri)
    return logged.model_uri


def log_rf_model(model: nn.Module, info: dict[str, Any], rf: RandomForestClassifier, examples: np.ndarray,
                 extra_info: dict[str, Any]) -> str:
    """Log backbone + forest as one image→label pyfunc (`pyfunc_rf.py`); tag carsml.rf_model_uri."""
    import skops.io

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rf.skops"
        skops.io.dump(rf, path)
        untrusted = sorted(set(skops.io.get_untrusted_types(file=path)) - set(SKOPS_TRUSTED_TYPES))
        if untrusted:  # the served model could not load it: fail here, not at serving time
            raise CarsmlError(f"the RandomForest holds types the rf_model would refuse to load: {untrusted}")
        return log_model(model.cpu(), {**info, **extra_info}, examples, role="rf_model",
                         extra_artifacts={"rf": str(path)}, python_model=RF_PYFUNC_FILE)
