"""Served latency and throughput of a real `mlflow models serve` against a bare forward pass of the same model.

    python benchmarks/serving.py [--requests 40] [--rounds 4] [--serve-threads N] [--model-uri URI] [--no-write]

Without `--model-uri` it trains a tiny resnet50 (one `transfer` epoch at 64 px from scratch, four-colour dataset, as
tests/test_promote.py does) into a temporary SQLite store and serves that run's LoggedModel. With `--model-uri` (and
`MLFLOW_TRACKING_URI` set) it serves that model instead, e.g. `models:/carsml-resnet50@champion`.

Measures, for 1 and 32 real Stanford Cars JPEGs per request (../shared/data/stanford_cars/sample): the bare forward
of the model in this process (decoded uint8 batch ready, normalise + network + softmax), `pyfunc.predict` in this
process (base64 in, labels out), and sequential HTTP requests to the server on 127.0.0.1 (p50 / p95 latency,
images/s). The configurations are interleaved in rounds so that other load on the machine hits all of them alike.
Writes the table to docs/performance.md (section `serving`). Goal: served p50 for one image <= 1.5x the bare forward,
batch-32 served images/s >= 0.8x the bare batched forward.

Bounded and self-stopping: loopback only, every request has a timeout, the whole run has a deadline
(`--max-seconds`), and the server (its whole process group) is always stopped.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from report import machine, write_section  # noqa: E402

from tests.test_serving import Server  # noqa: E402 - the one way to start and stop `mlflow models serve`

SAMPLE = ROOT.parent / "shared" / "data" / "stanford_cars" / "sample"
BATCHES = (1, 32)
TRANSFER = {"model": "resnet50", "image_size": 64, "epochs": 1, "batch_size": 8, "device": "cpu",
            "pretrained": False, "lr": 1e-3}


def real_jpegs(n: int) -> list[str]:
    """Base64 of the first `n` sample JPEGs (bbox crops of varying sizes)."""
    index = pd.read_csv(SAMPLE / "sample_index.csv").head(n)
    return [base64.b64encode((SAMPLE / "cars_train_bbox_cropped" / name).read_bytes()).decode("ascii")
            for name in index["fname"]]


def tiny_model(folder: Path) -> tuple[str, str]:
    """Train one tiny resnet50 `transfer` run into a SQLite store under `folder`; return (tracking URI, model URI)."""
    import mlflow

    from carsml.cli import run_experiment
    from tests.test_promote import tracking_env, write_colour_dataset

    data = write_colour_dataset(folder / "colours")
    uri = f"sqlite:///{folder}/mlflow.db"
    with tracking_env(uri, folder, folder / "cache"):
        run_experiment("transfer", {**TRANSFER, "data": str(data)})
        run = mlflow.last_active_run()
    return uri, run.data.tags["carsml.model_uri"]


@contextmanager
def served(model_uri: str, tracking_uri: str, log: Path, env_extra: dict[str, str],
           startup_s: float) -> Iterator[str]:
    """`mlflow models serve` on a free loopback port (the test suite's `Server`); yields its URL, always stops it."""
    server = Server(model_uri, tracking_uri, log, env_extra, startup_s)
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(model_uri: str, tracking_uri: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds of bare forward, in-process pyfunc.predict and served requests for each batch size."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    classifier = pyfunc.unwrap_python_model()
    jpegs = real_jpegs(max(BATCHES) * 2)
    frames = {n: [jpegs[i:i + n] for i in range(0, len(jpegs) - n + 1, max(n, 1))] for n in BATCHES}
    decoded = {n: classifier.decode_frame(pd.DataFrame({"image": jpegs[:n]})) for n in BATCHES}

    def bare(n: int, threads: int) -> None:
        torch.set_num_threads(threads)
        classifier.infer(decoded[n])  # the engine's `predict`, as the served model runs it, on this thread

    env = {"CARSML_SERVE_THREADS": str(args.serve_threads)} if args.serve_threads else {}
    default = torch.get_num_threads()
    bare_threads = sorted({1, default})
    kinds = [f"bare{t}" for t in bare_threads] + ["pyfunc", "served"]
    times: dict[tuple[str, int], list[float]] = {(kind, n): [] for kind in kinds for n in BATCHES}
    with served(model_uri, tracking_uri, workdir / "server.log", env, args.startup_seconds) as url, \
            requests.Session() as session:
        def post(images: list[str]) -> None:
            body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}})
            response = session.post(f"{url}/invocations", data=body, timeout=60,
                                    headers={"Content-Type": "application/json"})
            if response.status_code != 200:
                raise RuntimeError(f"served request failed ({response.status_code}): {response.text[:500]}")
            if len(response.json()["predictions"]) != len(images):
                raise RuntimeError("served answer has the wrong number of rows")

        for n in BATCHES:  # warm-up: allocator, OpenMP teams, the server's first requests
            for _ in range(3):
                bare(n, 1)
                pyfunc.predict(pd.DataFrame({"image": frames[n][0]}))
                post(frames[n][0])
        per_round = max(1, args.requests // args.rounds)
        # torch's default thread count first, on its own: when other work shares the cores its OpenMP threads spin
        # and wait on each other, and that would slow down whatever ran next in an interleaved round
        for t in bare_threads[1:]:
            for n in BATCHES:
                bare(n, t)
                for _ in range(max(2, args.requests // (2 if n == 1 else 8))):
                    times[(f"bare{t}", n)].append(timed(lambda n=n, t=t: bare(n, t)))
                    if time.monotonic() > args.deadline:
                        raise RuntimeError(f"benchmark ran past --max-seconds {args.max_seconds}")
        for _ in range(args.rounds):
            for n in BATCHES:
                reps = per_round if n == 1 else max(2, per_round // 4)
                for i in range(reps):
                    images = frames[n][i % len(frames[n])]
                    paths = {"bare1": lambda n=n: bare(n, 1),
                             "pyfunc": lambda images=images: pyfunc.predict(pd.DataFrame({"image": images})),
                             "served": lambda images=images: post(images)}
                    order = list(paths)[i % 3:] + list(paths)[:i % 3]  # rotated: no path always runs first
                    for kind in order:
                        times[(kind, n)].append(timed(paths[kind]))
                if time.monotonic() > args.deadline:
                    raise RuntimeError(f"benchmark ran past --max-seconds {args.max_seconds}")
    torch.set_num_threads(default)
    return {"times": times, "bare_threads": bare_threads, "default_threads": default,
            **{key: getattr(classifier, key, None) for key in ("threads", "slots", "decode_threads")}}


def table(result: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """Markdown table of p50 / p95 latency and images/s per path and batch size, with the goal ratios (against the
    faster of the bare forwards)."""
    times, bare_threads = result["times"], result["bare_threads"]
    bare_head = " / ".join(f"{t} thread{'s' if t > 1 else ''}" for t in bare_threads)
    lines = [f"| images per request | bare forward p50 ({bare_head}) | pyfunc.predict p50 | served p50 | served p95 | "
             "served ÷ bare (p50) | bare images/s | served images/s | served ÷ bare (images/s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    ratios = {}
    for n in BATCHES:
        bares = [statistics.median(times[(f"bare{t}", n)]) for t in bare_threads]
        bare = min(bares)
        pyf, srv = (statistics.median(times[(k, n)]) for k in ("pyfunc", "served"))
        p95 = percentile(times[("served", n)], 95)
        ratios[f"latency_{n}"] = srv / bare
        ratios[f"throughput_{n}"] = bare / srv
        shown = " / ".join(f"{b * 1e3:.1f}" for b in bares)
        lines.append(f"| {n} | {shown} ms | {pyf * 1e3:.1f} ms | {srv * 1e3:.1f} ms | {p95 * 1e3:.1f} ms | "
                     f"{srv / bare:.2f} | {n / bare:.0f} | {n / srv:.0f} | {bare / srv:.2f} |")
    return "\n".join(lines), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="one-image requests per path (batch-32: a quarter)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the requests are spread over")
    parser.add_argument("--serve-threads", type=int, default=0, help="CARSML_SERVE_THREADS for the server (0: "
                        "the pyfunc's default)")
    parser.add_argument("--model-uri", default="", help="serve this model instead of training a tiny one "
                        "(needs MLFLOW_TRACKING_URI)")
    parser.add_argument("--workdir", default="", help="keep the tiny store here and reuse it on the next run")
    parser.add_argument("--startup-seconds", type=float, default=240)
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    args.deadline = time.monotonic() + args.max_seconds
    if not args.serve_threads and os.environ.get("CARSML_SERVE_THREADS", "").strip():
        args.serve_threads = int(os.environ["CARSML_SERVE_THREADS"])
    if args.serve_threads:  # the in-process pyfunc runs as the server does
        os.environ["CARSML_SERVE_THREADS"] = str(args.serve_threads)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="carsml-serving-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.model_uri:
            model_uri, tracking_uri = args.model_uri, os.environ.get("MLFLOW_TRACKING_URI", "")
            if not tracking_uri:
                parser.error("--model-uri needs MLFLOW_TRACKING_URI")
        elif (workdir / "model.json").exists():
            saved = json.loads((workdir / "model.json").read_text())
            tracking_uri, model_uri = saved["tracking_uri"], saved["model_uri"]
        else:
            tracking_uri, model_uri = tiny_model(workdir)
            (workdir / "model.json").write_text(json.dumps({"tracking_uri": tracking_uri, "model_uri": model_uri}))
        result = measure(model_uri, tracking_uri, workdir, args)
    load_after = os.getloadavg()

    body_table, ratios = table(result)
    setting = (f"`CARSML_SERVE_THREADS={args.serve_threads}`" if args.serve_threads
               else "`CARSML_SERVE_THREADS` unset (the default)")
    n_one, n_32 = (len(result["times"][("served", n)]) for n in BATCHES)
    ok_latency, ok_throughput = ratios["latency_1"] <= 1.5, ratios["throughput_32"] >= 0.8
    verdict = {True: "met", False: "not met"}
    flag = f" --serve-threads {args.serve_threads}" if args.serve_threads else ""
    body = f"""## Serving: `mlflow models serve` vs the bare forward pass

`python benchmarks/serving.py{flag}`: a tiny resnet50 at 64 px (one `transfer` epoch from scratch) served by a real
`mlflow models serve --env-manager local` on 127.0.0.1 with {setting}: {result["threads"]} torch thread(s) per
forward on {result["slots"]} inference thread(s), {result["decode_threads"]} decoding thread(s). Requests of real
Stanford Cars JPEGs (bbox crops, ~43 KB each) are sent one after another: {n_one} one-image and {n_32} 32-image
requests, interleaved (in rotating order) with the same number of in-process runs of each other path.

- bare forward: the network on an already decoded uint8 batch in the benchmark process (the engine's `predict` as the
  model serves it: normalise + forward + softmax), with 1 torch thread (interleaved) and with torch's default of
  {result["default_threads"]} (measured on its own just before); the ratios use the faster of the two;
- pyfunc.predict: the same model through `mlflow.pyfunc.load_model(...).predict` in the benchmark process (base64,
  checks, decoding, forward, output formatting);
- served: HTTP + JSON + MLflow's scoring server on top.

{machine()}; load average {load_before[0]:.1f} before and {load_after[0]:.1f} after the run (2 cores: above ~0.5,
other jobs shared the cores).

{body_table}

Goals: served p50 for one image <= 1.5x the bare forward: **{ratios["latency_1"]:.2f}x** ({verdict[ok_latency]});
batch-32 served images/s >= 0.8x the bare batched forward: **{ratios["throughput_32"]:.2f}x**
({verdict[ok_throughput]}). Threads and limits: docs/serving.md.
"""
    print(body)
    if not args.no_write:
        print("wrote", write_section("serving", body))


if __name__ == "__main__":
    main()
