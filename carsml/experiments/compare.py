"""The study's transfer-learning table (row 10) built from the runs in MLflow — never by re-evaluating a model.

One row per model: parameters, validation loss / accuracy at the selected (best-validation) epoch, test loss /
accuracy, correct and wrong test images, training time. Rows come from finished `transfer` runs: the children of one
`transfer_all` parent (`parent_run_id`), or every transfer run of the experiment, keeping per model the run with the
best validation accuracy (ties: lower validation loss) — the test split never selects anything.

`carsml compare` and the end of `transfer_all` call `compare_runs` / `build_table` + `log_table`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Run  # mlflow: the type of the parent run read through tracking.search

from carsml.errors import CarsmlError
from carsml.experiments.markdown import markdown_table
from carsml.tracking import tags as tag
from carsml.tracking.runs import log_figure, log_files, setup_tracking
from carsml.tracking.search import experiment_id, experiment_names, get_run, search_runs, tracking_uri

# table column -> the metric fit_and_log logs
METRICS = {"params": "n_params", "val_loss": "best_val_loss", "val_acc": "best_val_acc", "test_loss": "test_loss",
           "test_acc": "test_acc", "correct": "test_correct", "errors": "test_errors", "train_seconds": "train_seconds"}
COLUMNS = ["model", *METRICS, "run_id"]
HEADERS = {"model": "model", "params": "params", "val_loss": "val loss", "val_acc": "val acc",
           "test_loss": "test loss", "test_acc": "test acc", "correct": "correct", "errors": "errors",
           "train_seconds": "train time"}
ARTIFACT_DIR = "tables"
STEM = "transfer_comparison"


def _experiment_id(experiment_name: str) -> str:
    found = experiment_id(experiment_name)
    if found is None:
        raise CarsmlError(f"experiment {experiment_name!r}: not found at tracking URI {tracking_uri()}; "
                          f"known: {', '.join(experiment_names()) or '(none)'}")
    return found


def _parent(parent_run_id: str) -> Run:
    parent = get_run(parent_run_id, "parent_run_id")
    entry = parent.data.tags.get(tag.ENTRY_POINT)
    if entry != "transfer_all":
        raise CarsmlError(f"parent_run_id={parent_run_id!r} is a {entry!r} run, not a transfer_all run")
    return parent


def transfer_runs(experiment: str, parent_run_id: str = "") -> pd.DataFrame:
    """Finished `transfer` runs of an experiment (only the children of `parent_run_id` when given), one row each."""
    query = f"tags.`{tag.ENTRY_POINT}` = 'transfer' and attributes.status = 'FINISHED'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    rows = [{"model": run.data.tags.get(tag.MODEL), "run_id": run.info.run_id,
             **{column: float(run.data.metrics.get(metric, np.nan)) for column, metric in METRICS.items()}}
            for run in search_runs([experiment], query)]
    return pd.DataFrame(rows, columns=COLUMNS)


def best_per_model(runs: pd.DataFrame) -> pd.DataFrame:
    """The run with the highest validation accuracy per model (ties: lower validation loss)."""
    ranked = runs.dropna(subset=["model"]).sort_values(["val_acc", "val_loss"], ascending=[False, True],
                                                       na_position="last")
    return ranked.drop_duplicates("model", keep="first")


def build_table(experiment_name: str = "stanford-cars", parent_run_id: str = "") -> pd.DataFrame:
    """The comparison table from MLflow: the children of a transfer_all parent (in its `models` order), or the best
    run per model in the experiment (by validation accuracy, best first). CarsmlError when there is no run."""
    if parent_run_id:
        parent = _parent(parent_run_id)
        experiment = parent.info.experiment_id
        where = f"transfer_all run {parent_run_id}"
    else:
        experiment = _experiment_id(experiment_name)
        where = f"experiment {experiment_name!r}"
    table = best_per_model(transfer_runs(experiment, parent_run_id))
    if table.empty:
        raise CarsmlError(f"no finished transfer runs in {where} (tracking URI {tracking_uri()}); "
                          f"run `carsml transfer` or `carsml transfer-all` first")
    if parent_run_id:
        order = [m.strip() for m in parent.data.params.get("models", "").split(",") if m.strip()]
        rank = {name: i for i, name in enumerate(order)}
        table = table.assign(_rank=table["model"].map(lambda m: rank.get(m, len(rank)))).sort_values(
            ["_rank", "model"]).drop(columns="_rank")
    return table.reset_index(drop=True)


def _params(n: float) -> str:
    if np.isnan(n):
        return "–"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{int(n):,}"


def _duration(seconds: float) -> str:
    if np.isnan(seconds):
        return "–"
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def to_markdown(table: pd.DataFrame) -> str:
    """The table in the study's layout (losses and accuracies to 4 decimals, params in millions, h:mm:ss)."""
    def number(v: float, fmt: str) -> str:
        return "–" if np.isnan(v) else format(v, fmt)

    rows = [[str(row.model), _params(row.params), number(row.val_loss, ".4f"), number(row.val_acc, ".4f"),
             number(row.test_loss, ".4f"), number(row.test_acc, ".4f"), number(row.correct, ".0f"),
             number(row.errors, ".0f"), _duration(row.train_seconds)] for row in table.itertuples(index=False)]
    return markdown_table(list(HEADERS.values()), rows)


def write_table(table: pd.DataFrame, folder: Path) -> tuple[Path, Path]:
    """Write `transfer_comparison.md` and `.csv` into `folder` (created); returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    md, csv = folder / f"{STEM}.md", folder / f"{STEM}.csv"
    md.write_text(to_markdown(table))
    table.to_csv(csv, index=False)
    return md, csv


def _figure(table: pd.DataFrame):  # noqa: ANN202 - a matplotlib Figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(table) + 2, 3.5))
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["val_acc"], width=0.4, label="val acc")
    ax.bar(x + 0.2, table["test_acc"], width=0.4, label="test acc")
    ax.set_xticks(x, table["model"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Transfer learning: accuracy per model")
    ax.legend()
    fig.tight_layout()
    return fig


def log_table(table: pd.DataFrame, run_id: str) -> None:
    """Log the table (Markdown + CSV) and an accuracy bar chart to run `run_id` (active or finished)."""
    with tempfile.TemporaryDirectory() as tmp:
        log_files(write_table(table, Path(tmp)), ARTIFACT_DIR, run_id)
    log_figure(_figure(table), f"figures/{STEM}.png", run_id=run_id)


def compare_runs(experiment_name: str = "stanford-cars", parent_run_id: str = "",
                 output: Path = Path(".")) -> pd.DataFrame:
    """`carsml compare`: build the table, write it to `output`, and log it to the parent run when one is given."""
    setup_tracking()
    table = build_table(experiment_name, parent_run_id)
    write_table(table, Path(output))
    if parent_run_id:
        log_table(table, parent_run_id)
    return table
