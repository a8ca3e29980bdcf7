"""carsml: fine-grained car classification on Stanford Cars, one MLflow entry point per experiment."""

__version__ = "0.1.0"
