"""`carsml report`: the study's tables and figures rebuilt from the MLflow tracking store alone.

Every number comes from a run's params, metrics, tags or artifacts (or the model registry), never from local files, and
names its run (`run`: the id's first 8 characters; a link relative to the MLflow UI). A section whose runs are missing
lists the row and the command that produces it; the others are still written. `build_report` reads, `to_markdown` /
`to_html` write (the HTML page is self-contained: figures are base64 PNG), `run` is the `report` entry point."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from mlflow.entities import Run  # mlflow: the type of the runs read through tracking.search

from carsml.config import load_config, options
from carsml.data.table import SPLITS
from carsml.errors import CarsmlError
from carsml.experiments import COMMANDS
from carsml.experiments.compare import build_table
from carsml.experiments.markdown import markdown_table
from carsml.experiments.promote import registered_names
from carsml.models.factory import create_model
from carsml.tracking import search
from carsml.tracking import tags as tag
from carsml.tracking.models import BUNDLE
from carsml.tracking.runs import log_metrics, log_text, setup_tracking, start_run

DEFAULT_EXPERIMENT = "stanford-cars"
BUNDLE_INFO = f"artifacts/{BUNDLE}/model.json"  # a carsml bundle's info inside its logged model
HEADS = {"net": "network", "rf": "RandomForest", "logreg": "logistic regression", "knn": "kNN"}
NAN = float("nan")
FINALS = ("best_val_acc", "best_val_loss", "test_acc", "test_loss")  # fit_and_log's finals shown next to train acc


@dataclass(frozen=True)
class Table:
    """One table: its numbers (last column `run`, the source run's first 8 characters) and each row's full run id."""
    title: str
    frame: pd.DataFrame
    run_ids: list[str]
    note: str = ""


class Figure(NamedTuple):
    """A PNG figure (one of the run's artifacts) and the run it comes from."""
    title: str
    png: bytes
    run_id: str


class Missing(NamedTuple):
    """A row the store does not hold yet, and the command that produces it."""
    what: str
    command: str


@dataclass
class Section:
    """One part of the report."""
    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)

    def add(self, title: str, rows: list[tuple[str, dict[str, Any]]], note: str = "") -> None:
        """A table of (source run id, row values) pairs; nothing when there is no row."""
        if rows:
            frame = pd.DataFrame([{**values, "run": run_id[:8]} for run_id, values in rows])
            self.tables.append(Table(title, frame, [run_id for run_id, _ in rows], note))


@dataclass
class Report:
    """The report of one experiment; `experiments` maps every run id shown to its experiment id (for the links)."""
    experiment_name: str
    experiment_id: str
    tracking_uri: str
    sections: list[Section]
    experiments: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[Missing]:
        """Every missing row of every section."""
        return [m for s in self.sections for m in s.missing]

    def link(self, run_id: str) -> str:
        """The run's page, relative to the MLflow UI."""
        return f"#/experiments/{self.experiments.get(run_id, self.experiment_id)}/runs/{run_id}"


def _metric(run: Run, key: str) -> float:
    return float(run.data.metrics.get(key, NAN))


def _count(value: float) -> int | float:
    return int(value) if math.isfinite(value) else NAN


@dataclass(frozen=True)
class _Store:
    """The reported experiment (name and id): its latest runs, and the commands that add missing ones."""
    name: str
    id: str

    def need(self, section: Section, entry: str, what: str, keep: Callable[[Run], bool] = lambda run: True,
             extra: str = "") -> Run | None:
        """The latest finished `entry` run that `keep` accepts; else None, and `section` lists it as missing."""
        found = next((run for run in search.finished_runs(self.id, entry) if keep(run)), None)
        if found is None:
            section.missing.append(self.missing(what, entry, extra))
        return found

    def missing(self, what: str, entry: str, extra: str = "") -> Missing:
        command = f"carsml {COMMANDS[entry]}"
        if self.name != DEFAULT_EXPERIMENT and "experiment_name" in options(entry):
            command += f" --experiment-name {self.name}"
        return Missing(what, command + extra)

    def figure(self, section: Section, title: str, run: Run, path: str) -> None:
        """Add the run's PNG artifact `path` to `section` (nothing when the run has no such file)."""
        if png := search.run_artifact(run.info.run_id, path):
            section.figures.append(Figure(title, png, run.info.run_id))


def _data(store: _Store) -> Section:
    section = Section("Data statistics")
    if (run := store.need(section, "data_analysis", "data_analysis run")) is not None:
        section.add("Images per split and per class", [
            (run.info.run_id, {"split": split, "images": _count(_metric(run, f"{split}_images")),
                               "classes": _count(_metric(run, "n_classes")),
                               "per-class min": _count(_metric(run, f"{split}_class_count_min")),
                               "per-class mean": _metric(run, f"{split}_class_count_mean"),
                               "per-class max": _count(_metric(run, f"{split}_class_count_max"))})
            for split in SPLITS if f"{split}_images" in run.data.metrics])
    return section


def _last(run_id: str, key: str) -> float:
    return next(iter(search.metric_history(run_id, key)[-1:]), (0, NAN))[1]


def _not_fold(run: Run) -> bool:
    return not {tag.FOLD, tag.SELECTION_RUN_ID} & set(run.data.tags)


def _baseline_improved(store: _Store) -> Section:
    section, rows = Section("Baseline vs improved"), []
    for entry in ("baseline", "improved"):
        if (run := store.need(section, entry, f"{entry} run", _not_fold)) is None:
            continue
        run_id = run.info.run_id
        rows.append((run_id, {"entry point": entry, "model": run.data.tags.get(tag.MODEL, ""),
                              "final train acc": _last(run_id, "train_acc"),
                              "final train loss": _last(run_id, "train_loss"),
                              **{k: _metric(run, k) for k in FINALS},
                              "n_params": _count(_metric(run, "n_params")),
                              "train_seconds": _metric(run, "train_seconds")}))
        store.figure(section, f"{entry}: training curves", run, "figures/curves.png")
    section.add("Latest finished runs (refits and k-fold folds excluded)", rows,
                "final train acc / loss: the last epoch of the train_acc / train_loss history")
    return section


def _train_acc_at_selection(child: Run) -> tuple[float, str]:
    """Train accuracy at the selected (best-validation) epoch, else at the last epoch; and which epoch it is."""
    history, best = search.metric_history(child.info.run_id, "train_acc"), int(child.data.metrics.get("best_epoch", -1))
    epoch, value = next(((e, v) for e, v in history if e == best), history[-1] if history else (0, NAN))
    return value, f"{'selected' if epoch == best else 'last'} {epoch}"


def _kfold(store: _Store, entry: str) -> Section:
    section = Section(f"K-fold cross-validation: {entry}")
    parent = store.need(section, entry, f"{entry} parent run", lambda run: tag.FOLD not in run.data.tags)
    if parent is None:
        return section
    folds = {int(child.data.tags[tag.FOLD]): child  # a resumed fold: its latest finished run
             for child in sorted(search.child_runs(parent), key=lambda run: run.info.start_time)
             if child.info.status == "FINISHED" and tag.FOLD in child.data.tags}
    rows = []
    for fold, child in sorted(folds.items()):
        train_acc, at = _train_acc_at_selection(child)
        rows.append((child.info.run_id, {"fold": str(fold), "train acc": train_acc, "train acc epoch": at,
                                         **{k: _metric(child, k) for k in ("best_val_acc", "test_acc", "test_loss")}}))
    if rows:
        numbers = pd.DataFrame([values for _, values in rows]).drop(columns=["fold", "train acc epoch"])
        for name, values in (("mean", numbers.mean()), ("std", numbers.std(ddof=0))):
            rows.append((parent.info.run_id, {"fold": name, **values.to_dict(), "train acc epoch": ""}))
    section.add(f"{len(folds)} folds of parent run {parent.info.run_name}", rows,
                "train acc: at the fold's selected (best-validation) epoch (`best_epoch`), else at its last epoch, "
                "as `train acc epoch` says; mean and std (ddof 0) over the folds, run = the parent")
    store.figure(section, f"{entry}: mean curves over the folds", parent, "figures/mean_curves.png")
    return section


def _errors(store: _Store) -> Section:
    section = Section("Misclassification analysis (errors)")
    if (run := store.need(section, "errors", "errors run")) is None:
        return section
    split, run_id = run.data.params.get("split", "test"), run.info.run_id
    keys = (f"{split}_acc", f"{split}_errors", "ece", "errors_same_make_model_share", "chance_same_make_model_share")
    values = {key: _count(_metric(run, key)) if key.endswith("_errors") else _metric(run, key) for key in keys}
    section.add(f"Summary ({split} split, source run {run.data.tags.get(tag.SOURCE_RUN_ID, '?')[:8]})",
                [(run_id, {"split": split, **values})])
    raw = search.run_artifact(run_id, f"tables/confused_pairs_{split}.csv")
    pairs = pd.read_csv(io.BytesIO(raw)).head(5) if raw is not None else pd.DataFrame()
    section.add(f"Top {len(pairs)} confused pairs (tables/confused_pairs_{split}.csv)", [
        (run_id, {"true class": r.true_class, "predicted as": r.predicted_class, "images": int(r.count),
                  "share of true class": float(r.share_of_true_class), "relation": r.relation})
        for r in pairs.itertuples(index=False)])
    store.figure(section, "Most-confused pairs", run, f"figures/confused_pairs_{split}.png")
    return section


def _tta(store: _Store) -> Section:
    section, rows = Section("Test-time augmentation (every finished tta run)"), []
    for run in reversed(search.finished_runs(store.id, "tta")):
        split, params = run.data.params.get("split", "test"), run.data.params
        rows.append((run.info.run_id, {"source run": run.data.tags.get(tag.SOURCE_RUN_ID, "")[:8],
                                       "policy": params.get("policy", ""), "aggregation": params.get("aggregation", ""),
                                       "views": int(params.get("views", 0)), "split": split,
                                       "acc no TTA": _metric(run, f"{split}_acc_no_tta"),
                                       "acc TTA mean": _metric(run, f"{split}_acc_tta_mean"),
                                       "acc TTA vote": _metric(run, f"{split}_acc_tta_vote")}))
    section.add("Accuracy without and with TTA", rows,
                "metrics <split>_acc_no_tta, <split>_acc_tta_mean, <split>_acc_tta_vote")
    if not rows:
        section.missing.append(store.missing("tta run", "tta"))
    return section


NEW_CLASS_METRICS = ("new_class_acc", "new_class_recall", "new_class_precision", "new_class_f1", "old_class_acc",
                     "old_class_acc_source", "forgetting")


def _new_category(store: _Store) -> Section:
    section, rows = Section("A new category"), []
    for mode in ("scratch", "warmstart"):
        run = store.need(section, "new_category", f"new_category run, mode {mode}",
                         lambda r, mode=mode: r.data.tags.get(tag.MODE) == mode, f" --mode {mode}")
        if run is not None:
            rows.append((run.info.run_id, {"mode": mode, "new class": run.data.tags.get(tag.NEW_CLASS, ""),
                                           **{k: _metric(run, k) for k in NEW_CLASS_METRICS}}))
    section.add("Latest run per mode", rows, "forgetting = old_class_acc_source - old_class_acc")
    return section


def _without_classifier(run_id: str, n_params: float) -> float:
    """`n_params` less the classifier of the architecture recorded in the run's logged model (its bundle info,
    rebuilt on the meta device: no weights are read); NaN when the run logged no carsml model."""
    uri = search.get_run(run_id, "transfer run").data.tags.get(tag.MODEL_URI)
    raw = search.logged_model_artifact(uri, BUNDLE_INFO) if uri else None
    if raw is None or not math.isfinite(n_params):
        return NAN
    try:
        with torch.device("meta"):
            model = create_model(**json.loads(raw)["model_config"])
        return n_params - sum(p.numel() for p in model.get_classifier().parameters())
    except Exception:  # noqa: BLE001 - an architecture this carsml cannot rebuild: the count stays unknown
        return NAN


def _transfer(store: _Store) -> Section:
    section, found = Section("Transfer learning"), []
    parent = next(iter(search.finished_runs(store.id, "transfer_all")), None)
    sources = [(parent.info.run_id, f"Children of transfer_all run {parent.info.run_name}")] if parent else []
    for parent_id, where in [*sources, ("", "Best finished transfer run per model by validation accuracy")]:
        with contextlib.suppress(CarsmlError):
            found.append((build_table(store.name, parent_id), where))
            break
    if not found:
        section.missing.append(store.missing("transfer runs (one per model)", "transfer_all"))
        return section
    table, where = found[0]
    table.insert(2, "params without classifier",
                 [_without_classifier(r, n) for r, n in zip(table["run_id"], table["params"], strict=True)])
    note = "params without classifier: n_params less the classifier of the architecture in the run's logged model"
    if table["params without classifier"].isna().all():
        table = table.drop(columns="params without classifier")
        note = "params without classifier: unknown (no run logged a carsml model to read the architecture from)"
    section.add(where, [(row.pop("run_id"), row) for row in table.to_dict("records")],
                note + "; val = the selected (best-validation) epoch")
    return section


def _features_rf(store: _Store) -> Section:
    section = Section("RandomForest and other heads on network features (features_rf)")
    if (run := store.need(section, "features_rf", "features_rf run")) is None:
        return section
    rows = [(run.info.run_id, {"head": label, "val acc": _metric(run, f"{head}_val_acc"),
                               "test acc": _metric(run, f"{head}_test_acc")}) for head, label in HEADS.items()]
    backbone = run.data.tags.get(tag.MODEL, "?")
    section.add(f"Heads on {backbone} features (backbone run {run.data.tags.get(tag.BACKBONE_RUN_ID, '?')[:8]})",
                rows, "metrics <head>_val_acc / <head>_test_acc; network = the backbone's own classifier")
    return section


TUNE_COUNTS = ("n_trials_complete", "n_trials_pruned", "n_trials_failed", "trial_epochs_saved_by_pruning")


def _tune(store: _Store) -> Section:
    section = Section("Hyper-parameter tuning (tune)")
    if (run := store.need(section, "tune", "tune parent run", lambda r: tag.TRIAL_NUMBER not in r.data.tags)) is None:
        return section
    best = {key: value for key, value in sorted(run.data.metrics.items()) if key.startswith("best_")
            and key not in ("best_value", "best_trial_number", "best_epoch", "best_val_acc", "best_val_loss")}
    section.add(f"Study {run.data.tags.get('optuna.study_name', '?')}: its best trial (best_value: validation accuracy)"
                f" and this worker's trials", [(run.info.run_id, {
                    "best_value": _metric(run, "best_value"),
                    "best_trial_number": _count(_metric(run, "best_trial_number")), **best,
                    **{key: _count(_metric(run, key)) for key in TUNE_COUNTS}})])
    return section


def _registry(store: _Store, report: Report) -> Section:
    section, rows = Section("Registered champions"), []
    latest = next(iter(search.finished_runs(store.id, "promote")), None)  # the names it registered, else the defaults
    for name in registered_names(search.config_from_run(latest) if latest else load_config("promote", {})):
        if (version := search.registered_alias(name)) is None:
            section.missing.append(store.missing(f"{name}@champion", "promote"))
            continue
        source = version.tags.get("source_run_id") or version.run_id or ""
        with contextlib.suppress(CarsmlError):  # a deleted source run: the link points into the reported experiment
            report.experiments[source] = search.get_run(source, "source_run_id").info.experiment_id
        rows.append((source, {"registered model": name, "version": int(version.version), **{
                              key: float(version.tags.get(key, NAN)) for key in ("val_acc", "test_acc")},
                              "tags": ", ".join(f"{k}={v}" for k, v in sorted(version.tags.items()))}))
    section.add("Versions with alias champion (run: the version's source run)", rows)
    return section


def build_report(experiment_name: str) -> Report:
    """Every section's tables and figures from the runs of `experiment_name` (and the registry) in the current
    tracking store. CarsmlError when the experiment does not exist or holds no carsml run."""
    found = search.experiment_id(experiment_name)
    if found is None:
        raise CarsmlError(f"report: no MLflow experiment {experiment_name!r} at tracking URI "
                          f"{search.tracking_uri()}; known: {', '.join(search.experiment_names()) or '(none)'}")
    if not search.search_runs([found], f"tags.`{tag.ENTRY_POINT}` != 'report'", max_results=1):
        raise CarsmlError(f"report: experiment {experiment_name!r} (tracking URI {search.tracking_uri()}) holds no "
                          f"carsml runs, nothing to report; run the study's entry points first (`carsml data analyze`)")
    store = _Store(experiment_name, found)
    report = Report(experiment_name, found, search.tracking_uri(), [])
    report.sections = [_data(store), _baseline_improved(store), _kfold(store, "kfold_baseline"),
                       _kfold(store, "kfold_improved"), _errors(store), _tta(store), _new_category(store),
                       _transfer(store), _features_rf(store), _tune(store), _registry(store, report)]
    return report


def _cell(value: Any) -> str:
    """Counts as integers (a column holding a NaN turns them into floats), other numbers to 4 decimals."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return str(value)
    if isinstance(value, (int, np.integer)) or not math.isfinite(value) or (value.is_integer() and abs(value) >= 1):
        return f"{int(value):,}" if math.isfinite(value) else "–"
    return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4f}"


def _rows(table: Table) -> tuple[list[str], list[tuple[list[str], str]]]:
    """The header (`run` last) and each row's formatted cells (without `run`) with its run id."""
    columns = [c for c in table.frame.columns if c != "run"]
    return [*map(str, columns), "run"], [([_cell(row[c]) for c in columns], run_id) for (_, row), run_id
                                         in zip(table.frame.iterrows(), table.run_ids, strict=True)]


def _intro(report: Report) -> str:
    return (f"Generated by `carsml report` from the MLflow tracking store `{report.tracking_uri}` alone (runs' params, "
            f"metrics, tags and artifacts; the model registry), experiment `{report.experiment_name}` (id "
            f"{report.experiment_id}). Every row names its source run; the links are relative to the MLflow UI "
            f"(`mlflow ui --backend-store-uri <store>`, then http://127.0.0.1:5000/ followed by the link).")


def to_markdown(report: Report, heading_level: int = 1) -> str:
    """The report as Markdown (figures are in the HTML page only); `heading_level` is the title's level."""
    head = "#" * heading_level
    lines = [f"{head} carsml report: experiment `{report.experiment_name}`", "", _intro(report), ""]
    for section in report.sections:
        lines += [f"{head}# {section.title}", ""]
        for table in section.tables:
            header, rows = _rows(table)
            body = markdown_table(header, ([*cells, f"[{rid[:8]}]({report.link(rid)})"] for cells, rid in rows))
            lines += [f"**{table.title}**", "", body.rstrip("\n")]
            lines += ["", *([f"_{table.note}_", ""] if table.note else [])]
        lines += [*(f"- missing: {m.what}; produce it with `{m.command}`" for m in section.missing)]
        lines += [""] if section.missing else []
    return "\n".join(lines).rstrip() + "\n"


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
         "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}td:first-child{text-align:"
         "left}p.note{color:#555;font-size:90%}img{max-width:100%}li.missing{color:#a33}")


def to_html(report: Report) -> str:
    """The report as one self-contained HTML page: tables, and figures embedded as base64 PNG data URIs."""
    esc = html.escape

    def link(run_id: str) -> str:
        return f'<a href="{esc(report.link(run_id))}">{esc(run_id[:8])}</a>'

    body = [f"<h1>carsml report: experiment {esc(report.experiment_name)}</h1>",
            f"<p>{esc(_intro(report).replace('`', ''))}</p>"]
    for section in report.sections:
        body.append(f"<h2>{esc(section.title)}</h2>")
        for table in section.tables:
            header, rows = _rows(table)
            body += [f"<h3>{esc(table.title)}</h3>", "<table>",
                     "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>",
                     *("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + f"<td>{link(run_id)}</td></tr>"
                       for cells, run_id in rows)]
            body += ["</table>"] + ([f'<p class="note">{esc(table.note)}</p>'] if table.note else [])
        body += [f'<h3>{esc(f.title)} (run {link(f.run_id)})</h3><img alt="{esc(f.title)}" src="data:image/png;base64,'
                 f'{base64.b64encode(f.png).decode("ascii")}">' for f in section.figures]
        if section.missing:
            body += ["<ul>", *(f'<li class="missing">missing: {esc(m.what)}; produce it with '
                               f"<code>{esc(m.command)}</code></li>" for m in section.missing), "</ul>"]
    title = f"carsml report: {esc(report.experiment_name)}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def run(cfg: dict[str, Any]) -> Report:
    """The `report` entry point: build the report of `experiment_name`, write it to `out`, and (with `log`) log both
    files as artifacts of a `report` run in that experiment."""
    setup_tracking()
    report = build_report(search.searched_experiment_name(str(cfg["experiment_name"])))
    folder, texts = Path(cfg["out"]), {"report.md": to_markdown(report), "report.html": to_html(report)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    if cfg["log"]:
        with start_run(cfg["entry_point"], cfg, run_name="report"):
            for name, text in texts.items():
                log_text(text, name)
            log_metrics({"report_tables": sum(len(s.tables) for s in report.sections),
                         "report_figures": sum(len(s.figures) for s in report.sections),
                         "report_missing_rows": len(report.missing)})
    print(f"wrote {folder / 'report.md'} and {folder / 'report.html'}; {len(report.missing)} missing rows"
          + "".join(f"\n  missing: {m.what}: {m.command}" for m in report.missing))
    return report
