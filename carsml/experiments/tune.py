"""Hyperparameter tuning with Optuna: learning rate, dropout and weight decay of one model.

One MLflow parent run per invocation (one *worker*), one nested run per trial. Each trial trains with the shared
`fit_and_log` on the same stratified train/val split as every other run (the official test split is not even decoded)
and reports `val_acc` after every epoch to the pruner; a pruned trial's run ends KILLED (tag
`carsml.trial_state=pruned`), a failing trial's run ends FAILED without stopping the study. The objective is the
trial's best validation accuracy.

Several workers (processes, machines) share one study through its storage — any SQLAlchemy URL (`sqlite:///optuna.db`
by default, PostgreSQL/MySQL at scale) — and the `optuna` CLI reads the same storage (`optuna trials --storage <url>
--study-name <name>`). Everything that can be wrong with the options (ranges, sampler, pruner, storage, a study
created for another model or dataset) is reported before any MLflow run is created.

Under torchrun (`nproc` > 1) each trial is one model trained by all the processes (DDP): rank 0 is the worker (the
study, the MLflow runs, the pruner), and the other processes train each trial with it (`trial_replica`), leaving a
pruned trial when rank 0 does.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from carsml.data.cache import DecodedImages
from carsml.data.splits import membership_table, train_val_split
from carsml.data.table import Dataset
from carsml.engine import distributed
from carsml.engine.callbacks import Callback
from carsml.engine.loader import ArrayData
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments.common import build_model, limit_classes, resolve_dataset
from carsml.experiments.train import augment_images, decode, fit_and_log, join_processes, replica_fit, train_config
from carsml.progress import planned_fits
from carsml.tracking import tags as tag
from carsml.tracking.runs import (
    end_run,
    fail_run,
    library_log_level,
    log_csv,
    log_dataset,
    log_figure,
    log_metrics,
    log_text,
    set_tag,
    set_tags,
    setup_tracking,
    start_run,
)

log = logging.getLogger(__name__)

OBJECTIVE = "best_val_acc"  # maximised; per-epoch `val_acc` is what the pruner sees
# Options that change what a trial's value means: every worker of a study must agree on them.
STUDY_KEYS = ("model", "epochs", "image_size", "val_fraction", "seed", "max_classes", "batch_size", "optimizer",
              "scheduler", "augmentation", "use_boxes", "crop_margin")
SQLITE_LOCK_TIMEOUT_S = 60  # several workers on one SQLite file wait this long for its write lock


# ------------------------------------------------------------------------------------------------ search space


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the three tuned hyperparameters (lr and weight decay on a log scale)."""

    lr: tuple[float, float]
    dropout: tuple[float, float]
    weight_decay: tuple[float, float]

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        """Sample one point of the space for `trial`."""
        return {
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "dropout": trial.suggest_float("dropout", *self.dropout),
            "weight_decay": trial.suggest_float("weight_decay", *self.weight_decay, log=True),
        }


def search_space(cfg: dict[str, Any]) -> SearchSpace:
    """The search space of a tune config; ConfigError for inverted, non-positive (log scale) or out-of-range ends."""

    def bounds(name: str, *, log_scale: bool, upper: float = math.inf) -> tuple[float, float]:
        low, high = float(cfg[f"{name}_min"]), float(cfg[f"{name}_max"])
        for key, value in ((f"{name}_min", low), (f"{name}_max", high)):
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value!r}: expected a finite number")
        if log_scale and low <= 0:
            raise ConfigError(f"{name}_min={low!r}: {name} is searched on a log scale, so the range must be > 0")
        if low < 0 or high >= upper:
            raise ConfigError(f"{name} range [{low!r}, {high!r}]: expected values in [0, {upper})")
        if low > high:
            raise ConfigError(f"{name}_min={low!r} is larger than {name}_max={high!r}: the range is inverted")
        return low, high

    return SearchSpace(lr=bounds("lr", log_scale=True), dropout=bounds("dropout", log_scale=False, upper=1.0),
                       weight_decay=bounds("weight_decay", log_scale=True))


# ------------------------------------------------------------------------------------------ study construction


def storage_url(text: str) -> URL:
    """Parse the `storage` option; a relative SQLite path becomes absolute so every process (and the `optuna` CLI
    run from elsewhere) finds the same file."""
    try:
        url = make_url(text.strip())
    except ArgumentError:
        raise ConfigError(f"storage={text!r}: not a SQLAlchemy URL; expected e.g. sqlite:///optuna.db or "
                          f"postgresql://user@host/optuna") from None
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ConfigError(f"storage={text!r}: an in-memory SQLite study cannot be shared, resumed or read by the "
                              f"optuna CLI; give a file, e.g. sqlite:///optuna.db")
        url = url.set(database=str(Path(url.database).expanduser().resolve()))
    return url


def shown(url: URL) -> str:
    """The URL as logged and printed: the password hidden."""
    return url.render_as_string(hide_password=True)


def open_storage(url: URL, heartbeat_interval: int | None = None, max_retry: int = 0) -> optuna.storages.RDBStorage:
    """Connect to (and create the tables of) an Optuna RDB storage, or raise a CarsmlError saying why not. With a
    heartbeat, a trial whose worker fell silent for two intervals is failed (its MLflow run too) and retried up to
    `max_retry` times with the same parameters."""
    kwargs: dict[str, Any] = {}
    if heartbeat_interval is not None:
        kwargs.update(heartbeat_interval=heartbeat_interval, heartbeat_stale_trial_callback=_retry_stale(max_retry))
    if url.get_backend_name() == "sqlite":
        if not Path(url.database).parent.is_dir():
            raise CarsmlError(f"storage={shown(url)!r}: folder {Path(url.database).parent} does not exist")
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
    try:
        with warnings.catch_warnings():  # the heartbeat is experimental in Optuna 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url.render_as_string(hide_password=False), **kwargs)
    except ImportError as exc:
        raise CarsmlError(f"storage={shown(url)!r}: the database driver for {url.drivername!r} is not installed "
                          f"({exc}); e.g. `pip install psycopg2-binary` for PostgreSQL, `pymysql` for MySQL") from None
    except (SQLAlchemyError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0]
        raise CarsmlError(f"storage={shown(url)!r}: cannot open the Optuna storage ({reason}); expected a reachable "
                          f"database URL such as sqlite:///optuna.db or postgresql://user@host/optuna") from None


def _retry_stale(max_retry: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Optuna's stale-trial callback: end the stale trial's MLflow run FAILED, then retry its parameters."""
    with warnings.catch_warnings():  # experimental in Optuna 5.0, and the documented way to retry such trials
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            fail_run(run_id, f"trial {trial.number}: no heartbeat from its worker for two intervals (killed?); "
                             "retried with the same parameters")
        retry(study, trial)

    return callback


def make_sampler(cfg: dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded."""
    if cfg["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a running trial counts as a bad result, so parallel workers spread out instead of piling up
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg["sampler_startup_trials"], constant_liar=True)


def make_pruner(cfg: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The configured pruner; it judges the per-epoch val_acc each trial reports."""
    if cfg["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg["pruner_startup_trials"],
                                           n_warmup_steps=cfg["pruner_warmup_epochs"])
    if cfg["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg["epochs"], reduction_factor=3)
    return optuna.pruners.NopPruner()


def check_options(cfg: dict[str, Any]) -> SearchSpace:
    """Validate everything but the storage and data (no run exists yet); returns the search space."""
    if cfg["resume_run_id"]:
        raise ConfigError("resume_run_id: a tuning study is resumed through its Optuna storage "
                          "(same storage and study_name, load_if_exists true), not through an MLflow run")
    space = search_space(cfg)
    for key in ("n_trials", "sampler_startup_trials", "pruner_startup_trials", "pruner_warmup_epochs"):
        if cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]!r}: expected a number >= 0")
    if cfg["timeout"] is not None and cfg["timeout"] <= 0:
        raise ConfigError(f"timeout={cfg['timeout']!r}: expected a positive number of seconds (empty = no limit)")
    if cfg["n_trials"] == 0 and cfg["timeout"] is None:
        raise ConfigError("n_trials=0 and no timeout: the study would never stop; set n_trials or timeout")
    if cfg["heartbeat_interval"] is not None and cfg["heartbeat_interval"] < 1:
        raise ConfigError(f"heartbeat_interval={cfg['heartbeat_interval']!r}: expected seconds >= 1 (empty = off)")
    if cfg["max_retry"] < 0:
        raise ConfigError(f"max_retry={cfg['max_retry']!r}: expected a number >= 0")
    if cfg["sampler_seed"] is not None and cfg["sampler_seed"] < 0:
        raise ConfigError(f"sampler_seed={cfg['sampler_seed']!r}: expected a seed >= 0 (empty = derived)")
    if not str(cfg["study_name"]).strip():
        raise ConfigError("study_name: expected a non-empty name")
    for lr in space.lr:  # the engine must accept both ends of the ranges
        train_config({**cfg, "lr": lr, "weight_decay": space.weight_decay[1]})
    return space


def check_launch(cfg: dict[str, Any]) -> None:
    """What `--nproc N` checks before it starts the processes (`registry.BEFORE_LAUNCH`): the options and that the
    study's storage can be reached (rank 0 opens it again, under torchrun)."""
    check_options(cfg)
    open_storage(storage_url(str(cfg["storage"])))


def study_settings(cfg: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
    """What makes trial values comparable; stored on the study so later workers can be checked against it."""
    return {**{f"carsml_{k}": cfg[k] for k in STUDY_KEYS}, "carsml_data_digest": dataset.digest()}


def open_study(cfg: dict[str, Any], url: URL, settings: dict[str, Any]) -> tuple[optuna.Study, int]:
    """Create or load the study (checked against `settings`); returns it with the sampler seed used."""
    storage = open_storage(url, cfg["heartbeat_interval"], cfg["max_retry"])
    name = str(cfg["study_name"]).strip()
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    load_if_exists=cfg["load_if_exists"])
    except optuna.exceptions.DuplicatedStudyError:
        raise ConfigError(f"study_name={name!r} already exists in {shown(url)}; set load_if_exists true to "
                          f"continue it or choose another name") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"study {name!r} in {shown(url)} minimises; carsml studies maximise {OBJECTIVE}")
    stored = study.user_attrs
    clashes = {k: (stored[k], v) for k, v in settings.items() if k in stored and stored[k] != v}
    if clashes:
        listed = "; ".join(f"{k.removeprefix('carsml_')}: study has {a!r}, this worker {b!r}"
                           for k, (a, b) in clashes.items())
        raise ConfigError(f"study {name!r} in {shown(url)} was created with other settings ({listed}); its trial "
                          f"values would not be comparable. Use another study_name or the study's settings.")
    for key, value in settings.items():
        if key not in stored:
            study.set_user_attr(key, value)
    seed = cfg["sampler_seed"] if cfg["sampler_seed"] is not None else cfg["seed"] + len(study.trials)
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(cfg, seed),
                              pruner=make_pruner(cfg))
    return study, seed


# -------------------------------------------------------------------------------------------------- trials


class OptunaPruning(Callback):
    """Reports each epoch's val_acc to the trial and stops the fit with TrialPruned when the pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.epochs_run = 0

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs_run = epoch
        self.trial.report(metrics["val_acc"], step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.trial.number} pruned after epoch {epoch} "
                                     f"(val_acc {metrics['val_acc']:.4f})")


@dataclass
class TuneResult:
    """What one worker did, and the study's best trial so far (over every worker)."""

    study_name: str
    storage: str  # password hidden
    parent_run_id: str
    sampler_seed: int
    states: dict[int, str] = field(default_factory=dict)  # this worker's trials: number -> complete|pruned|failed
    epochs_run: dict[int, int] = field(default_factory=dict)  # trial number -> epochs trained
    best_value: float | None = None
    best_params: dict[str, float] = field(default_factory=dict)
    best_trial: int | None = None


@dataclass
class _Context:
    cfg: dict[str, Any]
    space: SearchSpace
    class_names: list[str]
    train: ArrayData
    val: ArrayData
    result: TuneResult


def _objective(ctx: _Context, trial: optuna.Trial) -> float:
    """One trial: a nested MLflow run training the sampled configuration (see the module docstring for states)."""
    params = ctx.space.suggest(trial)
    cfg = {**ctx.cfg, **params}
    pruning = OptunaPruning(trial)
    pruned: optuna.TrialPruned | None = None
    tags = {tag.TRIAL_NUMBER: str(trial.number), tag.STUDY_NAME: trial.study.study_name,
            tag.PARENT_RUN_ID: ctx.result.parent_run_id, tag.MODEL: cfg["model"],
            tag.TRIAL_STATE: "running"}
    try:
        with start_run(cfg["entry_point"], cfg, run_name=f"trial-{trial.number}", nested=True, tags=tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            try:
                model = build_model(cfg, len(ctx.class_names))  # every trial starts from the same seed's weights
                distributed.share(params)  # the DDP replicas train this trial with rank 0
                trained = fit_and_log(cfg, model, ctx.class_names, ctx.train, ctx.val, None, callbacks=(pruning,))
            except optuna.TrialPruned as exc:
                set_tags({tag.TRIAL_STATE: "pruned", tag.PRUNED_AT_EPOCH: pruning.epochs_run})
                end_run("KILLED")  # ends the trial run only; start_run would mark it FAILED
                pruned = exc
            except Exception:
                set_tag(tag.TRIAL_STATE, "failed")  # start_run adds carsml.error and ends it FAILED
                raise
            else:
                set_tag(tag.TRIAL_STATE, "complete")
    except Exception:
        ctx.result.states[trial.number] = "failed"
        raise  # study.optimize(catch=...) records the trial as FAIL and carries on with the next one
    finally:
        ctx.result.epochs_run[trial.number] = pruning.epochs_run
    if pruned is not None:
        ctx.result.states[trial.number] = "pruned"
        raise pruned
    ctx.result.states[trial.number] = "complete"
    return float(trained.finals[OBJECTIVE])


# -------------------------------------------------------------------------------------------------- summary


def _figures(study: optuna.Study, seed: int) -> None:
    """Optimisation history, intermediate values and (with >= 2 completed trials) parameter importances."""
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        log_figure(ovm.plot_optimization_history(study).figure, "figures/optimization_history.png")
        log_figure(ovm.plot_intermediate_values(study).figure, "figures/intermediate_values.png")
        if len(complete) < 2 or len({t.value for t in complete}) < 2:  # fANOVA needs values that differ
            distinct = [str(v) for v in sorted({round(t.value, 4) for t in complete})]
            set_tag(tag.PARAM_IMPORTANCE, f"skipped: needs >= 2 completed trials with different values; "
                    f"{len(complete)} completed, with {len(distinct)} distinct value(s) ({', '.join(distinct[:5])})")
            return
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
        log_metrics({f"importance_{k}": float(v) for k, v in importances.items()})
        log_figure(ovm.plot_param_importances(study, evaluator=evaluator).figure, "figures/param_importances.png")


def _summarise(study: optuna.Study, cfg: dict[str, Any], result: TuneResult) -> None:
    """Log this worker's counts, the pruning savings and the study's best trial to the parent run."""
    mine = list(result.states.values())
    finished = [n for n, s in result.states.items() if s in ("complete", "pruned")]
    budget = len(finished) * cfg["epochs"]
    ran = sum(result.epochs_run[n] for n in finished)
    saved_by_pruning = sum(cfg["epochs"] - result.epochs_run[n] for n, s in result.states.items() if s == "pruned")
    log_metrics({
        "n_trials_complete": mine.count("complete"), "n_trials_pruned": mine.count("pruned"),
        "n_trials_failed": mine.count("failed"), "trial_epochs_run": ran, "trial_epochs_budget": budget,
        "trial_epochs_saved_by_pruning": saved_by_pruning,
    })
    trials = study.trials
    log_csv(study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration")),
            "tables/trials.csv")
    states = optuna.trial.TrialState
    log_metrics({f"study_trials_{s.name.lower()}": sum(t.state == s for t in trials)
                        for s in (states.COMPLETE, states.PRUNED, states.FAIL)})
    if not any(t.state == states.COMPLETE for t in trials):
        raise CarsmlError(f"study {study.study_name!r}: no trial completed ({mine.count('pruned')} pruned, "
                          f"{mine.count('failed')} failed in this worker); see the nested runs' carsml.error tags")
    best = study.best_trial
    result.best_value, result.best_params, result.best_trial = best.value, dict(best.params), best.number
    log_metrics({"best_value": best.value, "best_trial_number": best.number,
                        **{f"best_{k}": float(v) for k, v in best.params.items()}})
    set_tag(tag.BEST_TRIAL_RUN_ID, best.user_attrs.get("mlflow_run_id", ""))
    log_text(json.dumps({"value": best.value, "trial": best.number, "params": best.params,
                         "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}, indent=2), "best_params.json")
    _figures(study, cfg["seed"])


# ------------------------------------------------------------------------------------------------------ run


def run(cfg: dict[str, Any]) -> TuneResult:
    """Run `n_trials` trials (or until `timeout`) of the study as one worker; see the module docstring."""
    setup_tracking()
    optuna.logging.set_verbosity(library_log_level())  # quiet unless --verbose, as MLflow
    space = check_options(cfg)
    url = storage_url(str(cfg["storage"]))
    here = join_processes(cfg)
    dataset = limit_classes(resolve_dataset(cfg), cfg["max_classes"])
    build_model(cfg, dataset.num_classes, dropout=space.dropout[1])  # model options fail here, not in a trial
    if not here.main:
        trial_replica(cfg, dataset)
        return TuneResult(str(cfg["study_name"]), shown(url), "", -1)
    study, seed = open_study(cfg, url, study_settings(cfg, dataset))
    logged_cfg = {**cfg, "storage": shown(url)}  # never log a database password
    tags = {tag.MODEL: cfg["model"], "optuna.storage": shown(url), "optuna.study_name": study.study_name,
            tag.SAMPLER_SEED: str(seed)}
    with start_run(cfg["entry_point"], logged_cfg, run_name=f"tune-{cfg['model']}", tags=tags) as parent:
        result = TuneResult(study.study_name, shown(url), parent.info.run_id, seed)
        rows, train, val = tuning_data(cfg, dataset)
        distributed.barrier()  # DDP replicas wait here for the cache
        log_dataset(dataset, rows.table, "train")
        log_csv(membership_table(rows.table["fname"], {"train": train.index, "val": val.index}),
                "data/split_membership.csv")
        ctx = _Context(cfg, space, dataset.class_names, train, val, result)
        try:
            with planned_fits(cfg["n_trials"] or 1, "trial"):  # pruned trials end early: the ETA is an upper bound
                study.optimize(lambda trial: _objective(ctx, trial), n_trials=cfg["n_trials"] or None,
                               timeout=cfg["timeout"], catch=(Exception,), gc_after_trial=True)
        finally:
            distributed.share(None)  # no more trials: the DDP replicas return
        _summarise(study, cfg, result)
    return result


def tuning_data(cfg: dict[str, Any], dataset: Dataset) -> tuple[DecodedImages, ArrayData, ArrayData]:
    """The official train split (decoded, cached) and every trial's train / validation part of it. The test split is
    never decoded: nothing here may look at it."""
    rows = decode(cfg, dataset, "train")
    train_idx, val_idx = train_val_split(rows.labels, cfg["val_fraction"], cfg["seed"])
    augment = augment_images(cfg, dataset, rows)
    return (rows, ArrayData(augment.images, augment.labels).subset(train_idx),
            ArrayData(rows.images, rows.labels).subset(val_idx))


def trial_replica(cfg: dict[str, Any], dataset: Dataset) -> None:
    """A DDP replica of `run` (rank > 0): trains each trial rank 0 starts, with the parameters it sampled, until rank 0
    says there are no more. A trial that fails fails on every process (the same options and data), and rank 0 records
    it; the replica goes on to the next one as rank 0 does."""
    _, train, val = tuning_data(cfg, dataset)  # cached by rank 0: read, not decoded
    while (params := distributed.share(None)) is not None:
        trial_cfg = {**cfg, **params}
        try:
            replica_fit(trial_cfg, build_model(trial_cfg, dataset.num_classes), train, val)
        except Exception as exc:  # noqa: BLE001 - rank 0 records the failure; the study goes on
            log.warning("trial with %s failed in this replica: %s", params, exc)
