"""carsml against a plain PyTorch loop on REAL Stanford Cars crops (the 60-class dev set), side by side in one run.

    python benchmarks/real_dev.py [--classes 20] [--size 96] [--epochs 30] [--seed 42] [--runs NAME,...]
                                  [--set key=value ...]

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
The test split is reported only: every choice (the epoch budget of the refit, the recipe itself) was made on
validation data.

Writes the table to docs/results.md (section real-dev) unless --no-write.
"""

from __future__ import annotations

import argparse
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
from carsml.experiments.features_rf import _markdown as markdown_table  # noqa: E402
from carsml.tracking.runs import setup_tracking  # noqa: E402

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford_cars_real_dev" / "car_data"
RESULTS_MD = Path(__file__).resolve().parents[1] / "docs" / "results.md"
EXPERIMENT = "real-dev"
DEFAULT_SEED = load_config("transfer", {})["seed"]  # the entry points' own default
RUNS = ("plain_all", "carsml_select", "plain_80", "carsml_refit", "tta", "improved_study", "improved_carsml",
        "improved_refit", "baseline_study")


class Bench:
    """The runs of one benchmark invocation and the rows of its table."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.ids: dict[str, str] = {}
        self.tta_note = ""
        self.common = {"data": str(args.data), "max_classes": args.classes or None, "image_size": args.size,
                       "epochs": args.epochs, "experiment_name": EXPERIMENT, "device": args.device, "seed": args.seed}

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
                                    train_files=train_files, seed=self.args.seed)
            mlflow.log_params({"runner": "benchmarks/plain_loop.py", "classes": self.args.classes,
                               "image_size": self.args.size, "epochs": self.args.epochs, "seed": self.args.seed,
                               "train_files": "carsml_select's 80 %" if train_files else "whole train split"})
            mlflow.log_metrics(result)
        self.ids[name] = run.info.run_id
        self.add(name, result["test_acc"], result["test_top5"], result["wall_seconds"],
                 result["images_per_second"], None, run.info.run_id, self.args.epochs)

    def add(self, name: str, acc: float | None, top5: float | None, wall: float, ips: float,
            val: float | None, run_id: str, epochs: Any) -> None:
        row = {"run": name, "test acc": acc, "top-5": top5, "val acc": val, "epochs": epochs,
               "wall s": round(wall), "train img/s": round(ips), "MLflow run": run_id[:8]}
        self.rows.append(row)
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEV, help="class-folder dataset (default: the real dev set)")
    parser.add_argument("--classes", type=int, default=20, help="the first N classes (0 = all 60)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of every run (carsml's split, weights "
                        "and augmentation; the plain loop's weights and data order); default: carsml's default seed")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--set", nargs="*", default=[], help="key=value options for the recipe runs")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; expected some of {', '.join(RUNS)}")
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: no such folder (the real dev set lives in ../shared/data)")
    setup_tracking()  # $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    mlflow.set_experiment(EXPERIMENT)
    bench, extra = Bench(args), parse_assignments(args.set)
    recipe = {**bench.common, "model": "resnet18", "pretrained": False, "recipe": "carsml", **extra}
    for name in runs:
        if name == "plain_all":
            bench.plain(name, None)
        elif name == "carsml_select":
            bench.carsml(name, "transfer", recipe)
        elif name == "plain_80":
            if "carsml_select" not in bench.ids:
                parser.error("plain_80 trains on carsml_select's images: run carsml_select first")
            with tempfile.TemporaryDirectory() as tmp:
                path = mlflow.artifacts.download_artifacts(run_id=bench.ids["carsml_select"],
                                                           artifact_path="data/split_membership.csv", dst_path=tmp)
                members = pd.read_csv(path)
            bench.plain(name, set(members.loc[members["role"] == "train", "fname"]))
        elif name == "carsml_refit":
            if "carsml_select" not in bench.ids:
                parser.error("carsml_refit refits carsml_select: run carsml_select first")
            bench.carsml(name, "transfer", {"refit_run_id": bench.ids["carsml_select"]})
        elif name == "tta":
            source = bench.ids.get("carsml_refit") or bench.ids.get("carsml_select")
            if source is None:
                parser.error("tta needs carsml_refit or carsml_select first")
            start = time.perf_counter()
            result = run_experiment("tta", {"run_id": source, "experiment_name": EXPERIMENT, "device": args.device})
            m = result.metrics
            of = "carsml_refit" if "carsml_refit" in bench.ids else "carsml_select"
            bench.add(f"tta on {of}", m["test_acc_tta"], None, time.perf_counter() - start, 0, None, result.run_id,
                      "")
            bench.tta_note = (f"TTA (carsml's default: 25 light views, mean of softmax) on {of}: "
                              f"{m['tta_delta'] * 100:+.1f} points ({m['tta_fixed']:.0f} fixed, {m['tta_broken']:.0f} "
                              f"broken, McNemar p = {m['tta_mcnemar_p']:.2f})")
        elif name == "improved_refit":
            if "improved_carsml" not in bench.ids:
                parser.error("improved_refit refits improved_carsml: run improved_carsml first")
            bench.carsml(name, "improved", {"refit_run_id": bench.ids["improved_carsml"]})
        elif name in ("improved_study", "improved_carsml", "baseline_study"):
            entry = name.split("_")[0]
            recipe_run = {"recipe": "carsml", **extra} if name.endswith("carsml") else {}
            bench.carsml(name, entry, {**bench.common, **recipe_run})
    table = pd.DataFrame(bench.rows)
    by = {row["run"]: row for row in bench.rows}
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
    if bench.tta_note:
        notes.append(bench.tta_note)
    body = (f"`python benchmarks/real_dev.py --classes {args.classes} --size {args.size} --epochs {args.epochs}"
            + (f" --seed {args.seed}" if args.seed != DEFAULT_SEED else "")
            + (f" --set {' '.join(args.set)}" if args.set else "") + f"` on {machine()}, {time.strftime('%Y-%m-%d')}; "
            f"real dev set, first {args.classes or 60} classes.\n\n" + markdown_table(table)
            + "".join(f"\n- {n}" for n in notes) + "\n")
    print(body)
    if not args.no_write:
        write_section("real-dev", body, RESULTS_MD)


if __name__ == "__main__":
    main()
