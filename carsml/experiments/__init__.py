"""Entry points: one function per experiment, each a short composition of data, models, engine and tracking.

`COMMANDS` names the CLI command of every entry point (the CLI builds it, and the MLproject an entry point, from the
entry point's defaults file `carsml/experiments/defaults/<name>.yaml`); `carsml.experiments.registry.ENTRY_POINTS` maps
the same names to their functions. The two live apart so that `carsml --help` does not import every experiment.
"""

from __future__ import annotations

# entry point -> carsml CLI command
COMMANDS: dict[str, str] = {
    "data_analysis": "data analyze",
    "baseline": "baseline",
    "kfold_baseline": "kfold-baseline",
    "improved": "improved",
    "kfold_improved": "kfold-improved",
    "errors": "errors",
    "tta": "tta",
    "new_category": "new-category",
    "transfer": "transfer",
    "transfer_all": "transfer-all",
    "features_rf": "features-rf",
    "tune": "tune",
    "promote": "promote",
    "report": "report",
    "study": "study",
}
