"""Entry points: one function per experiment, each a short composition of data, models, engine and tracking.

`REGISTRY` is the one list of entry points: the CLI builds a command and the MLproject an entry point for each name
that has a defaults file `experiments/<name>.yaml`.
"""

from __future__ import annotations

# entry point -> (carsml CLI command, "module:function" taking the resolved config dict)
REGISTRY: dict[str, tuple[str, str]] = {
    "data_analysis": ("data analyze", "carsml.experiments.data_analysis:run"),
    "baseline": ("baseline", "carsml.experiments.train:run"),
    "kfold_baseline": ("kfold-baseline", "carsml.experiments.kfold:run"),
    "improved": ("improved", "carsml.experiments.train:run"),
    "kfold_improved": ("kfold-improved", "carsml.experiments.kfold:run"),
    "errors": ("errors", "carsml.experiments.errors:run"),
    "tta": ("tta", "carsml.experiments.tta:run"),
    "new_category": ("new-category", "carsml.experiments.new_category:run"),
    "transfer": ("transfer", "carsml.experiments.transfer:run"),
    "transfer_all": ("transfer-all", "carsml.experiments.transfer:run_all"),
    "features_rf": ("features-rf", "carsml.experiments.features_rf:run"),
    "tune": ("tune", "carsml.experiments.tune:run"),
    "promote": ("promote", "carsml.experiments.promote:run"),
}
