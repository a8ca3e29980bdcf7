"""`mlflow models serve` of the promoted models: real JPEGs in, labels and top-5 out; every bad payload is a 4xx with
a clear message and the server keeps answering.

One module-wide store holds a tiny resnet50 transfer run, its RandomForest head and the promotion; one server per
registered model (`models:/<name>@champion`) runs on a free 127.0.0.1 port and is always stopped.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import requests
from PIL import Image

from carsml.cli import run_experiment
from carsml.tracking.pyfunc_model import MAX_IMAGE_BYTES, MAX_PIXELS
from tests.test_promote import COLOURS, NET, RF, build_store, tracking_env

STARTUP_TIMEOUT_S = 240  # loading torch and a resnet50 on a busy CI machine
CLASS_NAMES = [f"colour_{i}" for i in range(len(COLOURS))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One `mlflow models serve` process (its own process group, so stopping it stops uvicorn's workers too)."""

    def __init__(self, model_uri: str, tracking_uri: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bin_dir = str(Path(sys.executable).parent)  # uvicorn and mlflow must come from the venv
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking_uri}
        self.log = log
        self.proc = subprocess.Popen(
            [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)

    def post(self, payload: Any = None, *, data: str | None = None,
             content_type: str = "application/json") -> requests.Response:
        body = data if data is not None else json.dumps(payload)
        return requests.post(f"{self.url}/invocations", data=body, headers={"Content-Type": content_type}, timeout=120)


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    """A store where promote set champion on both registered models."""
    store = build_store(tmp_path_factory.mktemp("serving-store"), cache_dir, weak_run=False)
    with tracking_env(store["uri"], store["folder"], cache_dir):
        store["promotion"] = run_experiment("promote", {})
    return store


@pytest.fixture(scope="module")
def servers(promoted: dict[str, Any]) -> Iterator[dict[str, Server]]:
    """Both champions served at once (they start in parallel); always stopped."""
    started = {name: Server(f"models:/{name}@champion", promoted["uri"], promoted["folder"] / f"{name}.log")
               for name in (NET, RF)}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def frame(images: list[Any], column: str = "image") -> dict[str, Any]:
    return {"dataframe_split": {"columns": [column], "data": [[img] for img in images]}}


def real_jpegs(shared_data: Path, n: int) -> list[str]:
    index = pd.read_csv(shared_data / "sample" / "sample_index.csv").head(n)
    folder = shared_data / "sample" / "cars_train_bbox_cropped"
    return [base64.b64encode((folder / name).read_bytes()).decode("ascii") for name in index["fname"]]


def png(width: int, height: int, mode: str = "RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def check_predictions(rows: list[dict[str, Any]], n: int) -> None:
    assert len(rows) == n
    for row in rows:
        labels, scores = json.loads(row["top5_labels"]), json.loads(row["top5_scores"])
        assert row["label"] in CLASS_NAMES and CLASS_NAMES[row["class_id"]] == row["label"]
        assert labels[0] == row["label"] and sorted(labels) == sorted(CLASS_NAMES)  # 4 classes: top-5 lists all
        assert scores == sorted(scores, reverse=True) and scores[-1] >= 0 and scores[0] <= 1
        assert row["score"] == pytest.approx(scores[0], abs=1e-6)


def test_served_champions_label_real_jpegs_in_one_batch(servers: dict[str, Server], shared_data: Path) -> None:
    images = real_jpegs(shared_data, 6)
    for name, server in servers.items():
        response = server.post(frame(images))
        assert response.status_code == 200, response.text[:2000]
        rows = response.json()["predictions"]
        check_predictions(rows, len(images))
        single = server.post(frame(images[3:4])).json()["predictions"]  # the batch changes nothing per image
        assert single[0]["label"] == rows[3]["label"]
        assert single[0]["score"] == pytest.approx(rows[3]["score"], abs=1e-4), name


def test_served_model_matches_the_registered_pyfunc(servers: dict[str, Server], promoted: dict[str, Any],
                                                    shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", promoted["uri"])
    mlflow.set_tracking_uri(promoted["uri"])
    images = real_jpegs(shared_data, 3)
    local = mlflow.pyfunc.load_model(f"models:/{NET}@champion").predict(pd.DataFrame({"image": images}))
    served = servers[NET].post(frame(images)).json()["predictions"]
    assert [r["label"] for r in served] == list(local["label"])
    assert [r["score"] for r in served] == pytest.approx(list(local["score"]), abs=1e-5)


BAD_PAYLOADS = {
    "invalid base64": (frame(["not base64 !!!"]), 400, "not valid base64"),
    "not an image": (frame([base64.b64encode(b"just some text, not a JPEG").decode()]), 400,
                     "not a readable JPEG/PNG image"),
    "missing image column": (frame(["aGVsbG8="], column="picture"), 400, "missing inputs ['image']"),
    "empty frame": ({"dataframe_split": {"columns": ["image"], "data": []}}, 400, "input frame is empty"),
    "null image": (frame([None]), 400, "must be a non-empty base64 string"),
    "too many pixels": (frame([png(8000, 6000, mode="1")]), 400, f"more than {MAX_PIXELS:,} pixels"),
    "decompression bomb": (frame([png(20000, 10000, mode="1")]), 400, f"more than {MAX_PIXELS:,} pixels"),
}


def test_bad_payloads_are_4xx_with_a_clear_message_and_the_server_keeps_answering(
        servers: dict[str, Server], shared_data: Path) -> None:
    server = servers[NET]
    for case, (payload, status, fragment) in BAD_PAYLOADS.items():
        response = server.post(payload)
        assert response.status_code == status, (case, response.text[:1000])
        assert fragment in response.json()["message"], (case, response.text[:1000])
    too_big = base64.b64encode(os.urandom(MAX_IMAGE_BYTES + 1024)).decode("ascii")
    response = server.post(frame([too_big]))
    assert response.status_code == 400 and "larger than 20 MiB" in response.json()["message"]
    response = server.post(data="image=...", content_type="text/plain")
    assert response.status_code == 415 and "content types" in response.text
    response = server.post(data="{not json")
    assert response.status_code == 400 and "valid JSON" in response.json()["message"]
    # still serving, and the RF champion refuses bad input the same way
    good = real_jpegs(shared_data, 1)
    assert server.post(frame(good)).status_code == 200
    rf = servers[RF]
    response = rf.post(frame(["not base64 !!!"]))
    assert response.status_code == 400 and "not valid base64" in response.json()["message"]
    check_predictions(rf.post(frame(good)).json()["predictions"], 1)
