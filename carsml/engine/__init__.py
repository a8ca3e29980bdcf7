"""The training engine: one `fit` / `evaluate` for every model (any nn.Module mapping float NCHW → logits).

It reports through `Callback`s and never imports a tracking library; `carsml.tracking` adapts it to MLflow.
"""

from carsml.engine.callbacks import Callback, RichProgress
from carsml.engine.device import autocast_dtype, resolve_device, seed_everything
from carsml.engine.evaluate import EvalResult, Prediction, evaluate, predict, predict_probs
from carsml.engine.loader import ArrayData, iterate_batches
from carsml.engine.train import fit
from carsml.engine.types import FitResult, FitState, TrainConfig

__all__ = [
    "ArrayData",
    "Callback",
    "EvalResult",
    "FitResult",
    "FitState",
    "Prediction",
    "RichProgress",
    "TrainConfig",
    "autocast_dtype",
    "evaluate",
    "fit",
    "iterate_batches",
    "predict",
    "predict_probs",
    "resolve_device",
    "seed_everything",
]
