"""Every entry point's function, by name (the names of `carsml.experiments.COMMANDS`): each takes the resolved
config dict of its experiment (`carsml.config.load_config`) and returns what it computed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from carsml.experiments import (
    data_analysis,
    features_rf,
    kfold,
    misclassified,
    new_category,
    promote,
    report,
    study,
    train,
    transfer,
    tta,
    tune,
)

ENTRY_POINTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "data_analysis": data_analysis.run,
    "baseline": train.run,
    "kfold_baseline": kfold.run,
    "improved": train.run,
    "kfold_improved": kfold.run,
    "errors": misclassified.run,
    "tta": tta.run,
    "new_category": new_category.run,
    "transfer": transfer.run,
    "transfer_all": transfer.run_all,
    "features_rf": features_rf.run,
    "tune": tune.run,
    "promote": promote.run,
    "report": report.run,
    "study": lambda cfg: study.run(cfg, ENTRY_POINTS),  # the study runs the other entry points as its steps
}

# Checks that need neither data nor a run, made once by the command that launches several processes (`--nproc`),
# before torchrun starts them: a bad option is then one error, not one per process under torchrun's report.
BEFORE_LAUNCH: dict[str, Callable[[dict[str, Any]], None]] = {
    "kfold_baseline": kfold.check_launch,
    "kfold_improved": kfold.check_launch,
    "tune": tune.check_launch,
}
