"""Models: the study's baseline and improved CNNs, and one factory over them and every timm model.

Laid out as timm's: factory.py builds (create_model, model_config...), pretrained.py resolves pretrained
weights offline, weights.py loads weight files. Modules in here import those concrete modules, never this package.
"""

from carsml.models.baseline import BaselineCNN
from carsml.models.factory import (
    count_parameters,
    create_model,
    feature_dim,
    list_models,
    model_config,
    resolve_data_config,
)
from carsml.models.improved import ImprovedCNN, ResidualBlock, SqueezeExcite
from carsml.models.weights import load_weights

__all__ = [
    "BaselineCNN",
    "ImprovedCNN",
    "ResidualBlock",
    "SqueezeExcite",
    "count_parameters",
    "create_model",
    "feature_dim",
    "list_models",
    "load_weights",
    "model_config",
    "resolve_data_config",
]
