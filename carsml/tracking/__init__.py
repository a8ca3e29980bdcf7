"""Tracking: the only layer that talks to MLflow (runs, logging helpers, models, registry)."""
