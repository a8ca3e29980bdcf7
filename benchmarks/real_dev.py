"""carsml against a plain PyTorch loop on REAL Stanford Cars crops (the 60-class dev set), side by side in one run.

    python benchmarks/real_dev.py [--classes 20] [--first-class 1] [--size 96] [--epochs 30] [--seed 42[,1,2]]
                                  [--runs NAME,...] [--set key=value ...]

Runs (all at one image size, epoch budget and set of classes; each logged to the MLflow experiment `real-dev`):
  plain_all       the plain loop (benchmarks/plain_loop.py, no carsml code) on the whole train split
  carsml_select   carsml resnet18 from scratch with `recipe=carsml`: trains on 80 %, selects on the 20 % validation
  plain_80        the plain loop on exactly the images carsml_select trained on (its logged split membership)
  carsml_refit    the final carsml model: every training image, for the epochs carsml_select chose on validation
  tta             what test-time augmentation (carsml's default) adds to carsml_refit
  improved_study  improved_cnn with the study's settings; improved_carsml the same with `recipe=carsml`
  improved_refit  the final improved_cnn of the recipe: every training image, for the epochs improved_carsml chose
  baseline_study  baseline_cnn with the study's settings
`--set key=value` overrides options of the recipe runs (carsml_select, improved_carsml) to try a recipe variant.
`--seed 42,1,2` runs everything at each seed and adds a table of the goal's comparisons per seed and their mean.
`--first-class 21 --classes 20` runs on the classes 21-40 (in sorted folder order) instead of the first 20: a view of
the dataset, class folders linked under the temp directory, that carsml and the plain loop both read.
The test split is reported only: every choice (the epoch budget of the refit, the recipe itself) was made on
validation data.

Writes the table to docs/results.md (section real-dev) unless --no-write.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_loop  # noqa: E402
from report import machine, write_section  # noqa: E402

from carsml.cli import run_experiment  # noqa: E402
from carsml.config import load_config, parse_assignments  # noqa: E402
from carsml.errors import ConfigError  # noqa: E402
from carsml.experiments.markdown import frame_markdown  # noqa: E402
from carsml.experiments.train import train_config  # noqa: E402
from carsml.tracking.runs import setup_tracking  # noqa: E402

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford_cars_real_dev" / "car_data"
RESULTS_MD = Path(__file__).resolve().parents[1] / "docs" / "results.md"
EXPERIMENT = "real-dev"
DEFAULT_SEED = load_config("transfer", {})["seed"]  # the entry points' own default
RUNS = ("plain_all", "carsml_select", "plain_80", "carsml_refit", "tta", "improved_study", "improved_carsml",
        "improved_refit", "baseline_study")


FIRST_STAGE = ("carsml_select", "improved_study", "improved_carsml", "baseline_study")  # the runs that train anew


def first_stage(name: str, common: dict[str, Any], extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Entry point and options of FIRST_STAGE run `name`; `extra` (`--set`) goes to the recipe runs only."""
    if name == "carsml_select":
        return "transfer", {**common, "model": "resnet18", "pretrained": False, "recipe": "carsml", **extra}
    recipe_run = {"recipe": "carsml", **extra} if name.endswith("carsml") else {}
    return name.split("_")[0], {**common, **recipe_run}


class Bench:
    """The runs of one benchmark invocation at one seed, and the rows of its table."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        self.args, self.seed = args, seed
        self.rows: list[dict[str, Any]] = []
        self.ids: dict[str, str] = {}
        self.tta_note = ""
        self.common = {"data": str(args.data), "max_classes": args.classes or None, "image_size": args.size,
                       "epochs": args.epochs, "experiment_name": EXPERIMENT, "device": args.device, "seed": seed}

    def run(self, runs: list[str], extra: dict[str, Any]) -> None:
        """Every run named in `runs`, in that order (`check_order` has checked that each one's source comes first)."""
        for name in runs:
            if name in FIRST_STAGE:
                self.carsml(name, *first_stage(name, self.common, extra))
            elif name == "plain_all":
                self.plain(name, None)
            elif name == "plain_80":
                with tempfile.TemporaryDirectory() as tmp:
                    path = mlflow.artifacts.download_artifacts(run_id=self.ids["carsml_select"],
                                                               artifact_path="data/split_membership.csv", dst_path=tmp)
                    members = pd.read_csv(path)
                self.plain(name, set(members.loc[members["role"] == "train", "fname"]))
            elif name == "carsml_refit":
                self.carsml(name, "transfer", {"refit_run_id": self.ids["carsml_select"]})
            elif name == "improved_refit":
                self.carsml(name, "improved", {"refit_run_id": self.ids["improved_carsml"]})
            else:
                self.tta()

    def carsml(self, name: str, entry: str, options: dict[str, Any]) -> None:
        """One carsml entry point run; its row from the run's own metrics."""
        start = time.perf_counter()
        run_experiment(entry, options)
        wall = time.perf_counter() - start
        run = mlflow.last_active_run()
        self.ids[name] = run.info.run_id
        m = MlflowClient().get_run(run.info.run_id).data.metrics
        ips = [h.value for h in MlflowClient().get_metric_history(run.info.run_id, "images_per_second")]
        self.add(name, m.get("test_acc"), m.get("test_top5"), wall, sum(ips) / max(len(ips), 1),
                 m.get("best_val_acc"), run.info.run_id, run.data.params.get("epochs"))

    def plain(self, name: str, train_files: set[str] | None) -> None:
        """The plain loop, logged to MLflow like the carsml runs."""
        with mlflow.start_run(run_name=f"plain-loop-{name}") as run:
            result = plain_loop.run(self.args.data, self.args.classes, self.args.size, self.args.epochs,
                                    train_files=train_files, seed=self.seed)
            mlflow.log_params({"runner": "benchmarks/plain_loop.py", "classes": self.args.classes,
                               "image_size": self.args.size, "epochs": self.args.epochs, "seed": self.seed,
                               "train_files": "carsml_select's 80 %" if train_files else "whole train split"})
            mlflow.log_metrics(result)
        self.ids[name] = run.info.run_id
        self.add(name, result["test_acc"], result["test_top5"], result["wall_seconds"],
                 result["images_per_second"], None, run.info.run_id, self.args.epochs)

    def tta(self) -> None:
        """What carsml's default TTA adds to the final model (or to the selection run without one)."""
        of = "carsml_refit" if "carsml_refit" in self.ids else "carsml_select"
        start = time.perf_counter()
        result = run_experiment("tta", {"run_id": self.ids[of], "experiment_name": EXPERIMENT,
                                        "device": self.args.device})
        m = result.metrics
        self.add(f"tta on {of}", m["test_acc_tta"], None, time.perf_counter() - start, 0, None, result.run_id, "")
        self.tta_note = (f"TTA (carsml's default: 25 light views, mean of softmax) on {of}: "
                         f"{m['tta_delta'] * 100:+.1f} points ({m['tta_fixed']:.0f} fixed, {m['tta_broken']:.0f} "
                         f"broken, McNemar p = {m['tta_mcnemar_p']:.2f})")

    def add(self, name: str, acc: float | None, top5: float | None, wall: float, ips: float,
            val: float | None, run_id: str, epochs: Any) -> None:
        self.rows.append(table_row(name, acc, top5, val, wall, ips, run_id, epochs))

    def notes(self) -> list[str]:
        """The goal's comparisons at this seed."""
        by = {row["run"]: row for row in self.rows}
        notes = []
        if "carsml_refit" in by and "plain_all" in by:
            refit, plain, select = by["carsml_refit"], by["plain_all"], by["carsml_select"]
            notes.append(f"carsml final model vs plain loop on the whole train split: "
                         f"{(refit['test acc'] - plain['test acc']) * 100:+.1f} points, wall "
                         f"{refit['wall s'] / plain['wall s']:.2f}x (refit alone), "
                         f"{(refit['wall s'] + select['wall s']) / plain['wall s']:.2f}x (selection + refit)")
        if "carsml_select" in by and "plain_80" in by:
            notes.append(f"the recipe alone, same 80 % of the images: carsml_select vs plain_80 "
                         f"{(by['carsml_select']['test acc'] - by['plain_80']['test acc']) * 100:+.1f} points")
        for run in ("improved_carsml", "improved_refit"):
            if run in by and "improved_study" in by:
                notes.append(f"improved_cnn: {run} / improved_study = "
                             f"{by[run]['test acc'] / by['improved_study']['test acc']:.2f}x test accuracy")
        if self.tta_note:
            notes.append(self.tta_note)
        return notes


def table_row(name: str, acc: float | None, top5: float | None, val: float | None, wall: float, ips: float,
              run_id: str, epochs: Any) -> dict[str, Any]:
    """One run's row of a benchmark table (printed as it is made); a wall time of NaN (not measured) is left empty."""
    row = {"run": name, "test acc": acc, "top-5": top5, "val acc": val, "epochs": epochs,
           "wall s": round(wall) if math.isfinite(wall) else None, "train img/s": round(ips), "MLflow run": run_id[:8]}
    print(row, flush=True)
    return row


# (summary column, numerator run, denominator run, kind): the goal's comparisons, one row per seed
COMPARISONS = (
    ("final model - plain_all (points)", "carsml_refit", "plain_all", "points"),
    ("refit wall / plain_all wall", "carsml_refit", "plain_all", "wall"),
    ("carsml_select - plain_80 (points)", "carsml_select", "plain_80", "points"),
    ("improved_carsml / improved_study", "improved_carsml", "improved_study", "ratio"),
    ("improved_refit / improved_study", "improved_refit", "improved_study", "ratio"),
)


def summary(benches: list[Bench]) -> tuple[pd.DataFrame, list[str]]:
    """One row per seed (test accuracies and the goal's comparisons) and a mean row: accuracies and points
    averaged, ratios of the averages; plus, per comparison in points, its mean and standard error over the seeds."""
    names = [name for name in RUNS if name != "tta" and all(name in b.ids for b in benches)]
    rows = []
    for bench in benches:
        by = {row["run"]: row for row in bench.rows}
        rows.append({"seed": str(bench.seed), **{name: by[name]["test acc"] for name in names},
                     **{f"{name} wall s": by[name]["wall s"] for name in ("plain_all", "carsml_refit")
                        if name in names}})
    table = pd.DataFrame(rows)
    mean = {"seed": "**mean**", **table.drop(columns="seed").mean().to_dict()}
    table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    lines = []
    for column, top, bottom, kind in COMPARISONS:
        if top not in names or bottom not in names:
            continue
        if kind == "points":
            points = (table[top] - table[bottom]) * 100
            per_seed = points.iloc[:-1]
            se = per_seed.std(ddof=1) / len(per_seed) ** 0.5 if len(per_seed) > 1 else float("nan")
            lines.append(f"{top} vs {bottom} over {len(per_seed)} seeds: {per_seed.mean():+.1f} points "
                         f"(standard error {se:.1f}; per seed {', '.join(f'{v:+.1f}' for v in per_seed)})")
            table[column] = [f"{v:+.1f}" for v in points]
        else:
            ratio = (table[f"{top} wall s"] / table[f"{bottom} wall s"] if kind == "wall"
                     else table[top] / table[bottom])
            table[column] = [f"{v:.2f}x" for v in ratio]
    table = table.drop(columns=[c for c in table.columns if c.endswith(" wall s")])
    return table, lines


def class_view(data: Path, first: int, count: int) -> Path:
    """`data` itself (`first` 1), else a class-folder dataset of its classes `first`..`first + count - 1` (1-based,
    sorted folder order; `count` 0: to the last), their folders linked under the temp directory at a stable path, so
    that carsml's cache and the runs' logged data path are the same at every invocation."""
    names = sorted(d.name for d in (data / "train").iterdir() if d.is_dir())
    last = len(names) if count == 0 else first - 1 + count
    if not 1 <= first <= last <= len(names):
        raise ValueError(f"classes {first}-{last}: {data} has {len(names)} classes (1-{len(names)})")
    if first == 1:
        return data
    view = Path(tempfile.gettempdir()) / "carsml-real-dev" / f"{data.parent.name}-classes-{first}-{last}" / data.name
    for split in ("train", "test"):
        (view / split).mkdir(parents=True, exist_ok=True)
        for name in names[first - 1:last]:
            link = view / split / name
            if not link.is_symlink():
                link.symlink_to((data / split / name).resolve(), target_is_directory=True)
    return view


def check_order(runs: list[str]) -> str | None:
    """Why `runs` cannot run in this order (a run named before the run it needs), or None."""
    needs = {"plain_80": ("carsml_select",), "carsml_refit": ("carsml_select",),
             "tta": ("carsml_refit", "carsml_select"), "improved_refit": ("improved_carsml",)}
    for i, name in enumerate(runs):
        if name in needs and not set(needs[name]) & set(runs[:i]):
            return f"run {name} needs {' or '.join(needs[name])} before it in --runs"
    return None


def seeds(text: str) -> list[int]:
    """`--seed 42` or `--seed 42,1,2`."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or integers separated by commas, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers separated by commas, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEV, help="class-folder dataset (default: the real dev set)")
    parser.add_argument("--classes", type=int, default=20, help="N classes (0 = all 60)")
    parser.add_argument("--first-class", type=int, default=1, help="the first of the N classes, 1-based")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=seeds, default=[DEFAULT_SEED], help="seed of every run (carsml's split, "
                        "weights and augmentation; the plain loop's weights and data order), or several separated "
                        "by commas: every run at each seed, then a table of the comparisons per seed and their mean; "
                        "default: carsml's default seed")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--set", nargs="*", default=[], help="key=value options for the recipe runs")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; expected some of {', '.join(RUNS)}")
    if problem := check_order(runs):
        parser.error(problem)
    if not (args.data / "train").is_dir():
        parser.error(f"--data {args.data}: no such class-folder dataset (expected train/<class>/ and test/<class>/; "
                     "the real dev set lives in ../shared/data)")
    source = args.data
    try:
        args.data = class_view(source, args.first_class, args.classes)
    except ValueError as err:
        parser.error(f"--first-class {args.first_class} --classes {args.classes}: {err}")
    n_classes = len([d for d in (args.data / "train").iterdir() if d.is_dir()])
    which = (f"first {args.classes or n_classes} classes" if args.first_class == 1
             else f"classes {args.first_class}-{args.first_class + n_classes - 1}")
    extra = parse_assignments(args.set)
    for name in FIRST_STAGE:  # every option checked before the first run starts
        if name in runs:
            entry, options = first_stage(name, Bench(args, args.seed[0]).common, extra)
            try:
                train_config(load_config(entry, options))
            except ConfigError as err:
                parser.error(f"{name}: {err}")
    setup_tracking()  # $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    mlflow.set_experiment(EXPERIMENT)
    benches = []
    for seed in args.seed:
        bench = Bench(args, seed)
        bench.run(runs, extra)
        benches.append(bench)
    several = len(benches) > 1
    table = pd.DataFrame([{**({"seed": b.seed} if several else {}), **row} for b in benches for row in b.rows])
    notes = [f"{f'seed {b.seed}: ' if several else ''}{note}" for b in benches for note in b.notes()]
    seed_arg = ",".join(map(str, args.seed))
    body = (f"`python benchmarks/real_dev.py --classes {args.classes}"
            + (f" --first-class {args.first_class}" if args.first_class != 1 else "")
            + f" --size {args.size} --epochs {args.epochs}"
            + (f" --seed {seed_arg}" if args.seed != [DEFAULT_SEED] else "")
            + (f" --runs {args.runs}" if runs != list(RUNS) else "")
            + (f" --set {' '.join(args.set)}" if args.set else "") + f"` on {machine()}, {time.strftime('%Y-%m-%d')}; "
            f"{'real dev set' if source == DEV else source}, {which}.\n\n" + frame_markdown(table)
            + "".join(f"\n- {n}" for n in notes) + "\n")
    if several:
        per_seed, lines = summary(benches)
        body += ("\nPer seed (test accuracy; points and ratios as in the notes above; the mean row's ratios are "
                 "ratios of the mean accuracies and wall times):\n\n" + frame_markdown(per_seed)
                 + "".join(f"\n- {line}" for line in lines) + "\n")
    print(body)
    if not args.no_write:
        write_section("real-dev", body, RESULTS_MD)


if __name__ == "__main__":
    main()
