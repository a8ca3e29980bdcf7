"""Models: the study's baseline and improved CNNs, and one factory over them and every timm model."""

from carsml.models.baseline import BaselineCNN
from carsml.models.factory import (
    count_parameters,
    create_model,
    feature_dim,
    list_models,
    load_weights,
    model_config,
    resolve_data_config,
)
from carsml.models.improved import ImprovedCNN, ResidualBlock, SqueezeExcite

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
