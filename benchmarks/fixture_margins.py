"""How much the learned numbers that tests lean on move between machines: the shared trained fixture of the test suite
(tests/conftest.py TRAINED_RUN) retrained under each variation a machine of this kind can cause — amp off vs bf16,
1 vs 2 torch threads, another seed — and, on each, what the analysis tests look at: the model's test accuracy, what
the default TTA changes, and how well `new_category` learns BIG_TRUCKS (warm-start and scratch, 2 epochs, the tests'
settings; in-run and through the fp32 pyfunc).

    python benchmarks/fixture_margins.py [--variants amp=off,threads=1,seed=42 amp=bf16,threads=2,seed=7 ...]

Writes the table to docs/testing.md. A test may assert a learned number only with a margin this table shows.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import machine, write_section  # noqa: E402

from carsml.experiments.markdown import frame_markdown  # noqa: E402
from tests.conftest import TRAINED_RUN  # noqa: E402

TESTING_MD = Path(__file__).resolve().parents[1] / "docs" / "testing.md"
DEFAULT_VARIANTS = ["amp=bf16,threads=1,seed=42", "amp=off,threads=1,seed=42", "amp=bf16,threads=2,seed=42",
                    "amp=bf16,threads=1,seed=7", "amp=off,threads=2,seed=7", "amp=bf16,threads=1,seed=123"]


def served_share(run_id: str, class_name: str = "BIG_TRUCKS") -> tuple[float, int]:
    """Share of the new class's test images that the logged (fp32) pyfunc labels `class_name`, and their count."""
    import mlflow
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(run_id)
    split = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="data/new_class_split.csv"))
    folder = Path(run.data.params["new_class_folder"])
    images = [base64.b64encode((folder / f).read_bytes()).decode() for f in split.loc[split["role"] == "test", "fname"]]
    labels = mlflow.pyfunc.load_model(run.data.tags["carsml.model_uri"]).predict(pd.DataFrame({"image": images}))
    return float((labels["label"] == class_name).mean()), len(images)


def measure(variant: dict[str, str], root: Path) -> dict[str, object]:
    """Train the fixture under `variant`, then run the default TTA and new_category (both modes) on it."""
    import mlflow
    import torch

    from carsml.cli import run_experiment

    torch.set_num_threads(int(variant["threads"]))
    folder = root / "-".join(f"{k}{v}" for k, v in variant.items())
    folder.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    os.chdir(folder)
    common = {"device": "cpu", "amp": variant["amp"]}
    start = time.perf_counter()
    run_experiment("improved", {**TRAINED_RUN, **common, "seed": int(variant["seed"])})
    run_id = mlflow.last_active_run().info.run_id
    train_s = time.perf_counter() - start
    source = mlflow.tracking.MlflowClient().get_run(run_id).data.metrics
    tta = run_experiment("tta", {"run_id": run_id, **common}).metrics
    row: dict[str, object] = {
        "variant": ",".join(f"{k}={v}" for k, v in variant.items()), "fixture test acc": source["test_acc"],
        "best epoch": source.get("best_epoch", float("nan")), "train s": round(train_s),
        "TTA fixed - broken (images)": int(tta["tta_fixed"] - tta["tta_broken"]),
    }
    for mode in ("warmstart", "scratch"):
        result = run_experiment("new_category", {"run_id": run_id, "mode": mode, "epochs": 2, "device": "cpu"})
        m = mlflow.tracking.MlflowClient().get_run(result.run_id).data.metrics
        share, count = served_share(result.run_id)
        row[f"{mode}: new-class acc"] = m["new_class_acc"]
        row[f"{mode}: precision"] = m["new_class_precision"]
        row[f"{mode}: served share ({count})"] = share
        row[f"{mode}: old-class acc"] = m["old_class_acc"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help="amp=off|bf16,threads=N,seed=N each (all three keys)")
    args = parser.parse_args()
    variants = [dict(item.split("=", 1) for item in text.split(",")) for text in args.variants]
    for v in variants:
        if set(v) != {"amp", "threads", "seed"}:
            parser.error(f"each variant needs amp, threads and seed; got {v}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CARSML_CACHE"] = str(Path(tmp) / "cache")
        for variant in variants:
            rows.append(measure(variant, Path(tmp)))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    numeric = table.select_dtypes("number")
    summary = pd.DataFrame([numeric.min(), numeric.max()]).T.reset_index()
    summary.columns = ["measure", "min", "max"]
    body = (f"Measured by `python benchmarks/fixture_margins.py` on {machine()}, {time.strftime('%Y-%m-%d')}.\n\n"
            + frame_markdown(table) + "\nAcross the variants:\n\n" + frame_markdown(summary))
    print(body)
    write_section("fixture-margins", body, TESTING_MD, header="# Testing\n")


if __name__ == "__main__":
    main()
