"""`mlflow models serve` of the promoted models: real JPEGs (and boxes) in, labels and top-5 out; every bad payload (a
bad box too) is a 4xx with a clear message (each bad request is its own test case) and the server answers a good
request right after it; a request mixing good and bad rows is refused as a whole, naming the bad rows. Abuse within the
per-image limits (too many rows, too many pixels or bytes in all, formats other than JPEG/PNG) is refused from the
headers, in less time than decoding one of its images, and leaves the server's memory (RSS) within SERVER_RSS_BOUND.

One module-wide store holds a tiny resnet50 transfer run, its RandomForest head and the promotion; one server per
registered model (`models:/<name>@champion`) runs on a free 127.0.0.1 port and is always stopped.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException
from PIL import Image

from carsml.cli import run_experiment
from carsml.tracking.pyfunc_model import (
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_PIXELS,
    MAX_ROWS,
    SERVE_THREADS_ENV,
    decode_images,
    default_threads,
    serve_threads,
)
from tests.conftest import free_port
from tests.test_promote import COLOURS, NET, RF, build_store, tracking_env

STARTUP_TIMEOUT_S = 240  # loading torch and a resnet50 on a busy CI machine
CLASS_NAMES = [f"colour_{i}" for i in range(len(COLOURS))]
MIB = 1024 * 1024
# What one server (the `mlflow models serve` process group: the CLI and uvicorn with the 32-px resnet50) may hold after
# the abuse in test_after_the_abuse_the_servers_memory_stays_bounded (docs/serving.md, "Limits"): measured ~1.2 GiB
# after startup and up to ~1.6 GiB after the abuse on 2 cores; most of the growth is the scoring server's own copies of
# a 43 MB request body, which glibc keeps for reuse. Repeating the abuse does not grow it further.
SERVER_RSS_BOUND = 2 * 1024 * MIB
SERVER_RSS_GROWTH = 768 * MIB  # after the abuse vs right after startup


class Server:
    """One `mlflow models serve` process (its own process group, so stopping it stops uvicorn's workers too)."""

    def __init__(self, model_uri: str, tracking_uri: str, log: Path, env_extra: dict[str, str] | None = None,
                 startup_s: float = STARTUP_TIMEOUT_S) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_s = startup_s
        bin_dir = str(Path(sys.executable).parent)  # uvicorn and mlflow must come from the venv
        env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **(env_extra or {}),
               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking_uri}
        self.log = log
        self.rss_at_start = 0  # set once the server is ready
        self.proc = subprocess.Popen(
            [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {self.startup_s:.0f}s:\n{self.log.read_text()[-3000:]}")

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

    def rss(self) -> int:
        """Resident memory (bytes) of the server's whole process group: the CLI and uvicorn's process."""
        return group_rss(self.proc.pid)


def group_rss(pgid: int) -> int:
    """Sum of VmRSS over the processes of process group `pgid` (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return sum(p.info["memory_info"].rss for p in psutil.process_iter(["memory_info"])
                   if p.info["memory_info"] is not None and _pgid(p.pid) == pgid)
    total = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _pgid(int(proc.name)) == pgid:
            try:
                status = (proc / "status").read_text()
            except OSError:
                continue
            total += next((int(line.split()[1]) * 1024 for line in status.splitlines()
                           if line.startswith("VmRSS:")), 0)
    return total


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


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
            server.rss_at_start = server.rss()
        yield started
    finally:
        for server in started.values():
            server.stop()


def frame(images: list[Any], column: str = "image") -> dict[str, Any]:
    return {"dataframe_split": {"columns": [column], "data": [[img] for img in images]}}


def boxed(images: list[str], boxes: list[Any]) -> dict[str, Any]:
    """A request with the optional `box` column."""
    return {"dataframe_split": {"columns": ["image", "box"], "data": [list(row) for row in zip(images, boxes,
                                                                                                 strict=True)]}}


def real_jpegs(shared_data: Path, n: int) -> list[str]:
    index = pd.read_csv(shared_data / "sample" / "sample_index.csv").head(n)
    folder = shared_data / "sample" / "cars_train_bbox_cropped"
    return [base64.b64encode((folder / name).read_bytes()).decode("ascii") for name in index["fname"]]


def png(width: int, height: int, mode: str = "RGB") -> str:
    return encoded(width, height, "PNG", mode)


def encoded(width: int, height: int, fmt: str, mode: str = "RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def check_predictions(rows: list[dict[str, Any]], n: int) -> None:
    assert len(rows) == n
    for row in rows:
        labels, scores = row["top5_labels"], row["top5_scores"]
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


def test_served_champion_crops_to_a_box_as_the_in_process_pyfunc_does(
        servers: dict[str, Server], promoted: dict[str, Any], shared_data: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", promoted["uri"])
    mlflow.set_tracking_uri(promoted["uri"])
    images, boxes = real_jpegs(shared_data, 2) * 2, [[4, 6, 90, 60], [0, 0, 40, 30], None, None]
    local = mlflow.pyfunc.load_model(f"models:/{NET}@champion").predict(pd.DataFrame({"image": images, "box": boxes}))
    response = servers[NET].post(boxed(images, boxes))
    assert response.status_code == 200, response.text[:1000]
    served = response.json()["predictions"]
    check_predictions(served, 4)
    assert [r["score"] for r in served] == pytest.approx(list(local["score"]), abs=1e-5)
    assert served[0]["top5_scores"] != served[2]["top5_scores"]  # the crop is what the model saw


def too_big() -> str:
    """Base64 of random bytes just over MAX_IMAGE_BYTES (built per use: ~28 MB of text)."""
    return base64.b64encode(os.urandom(MAX_IMAGE_BYTES + 1024)).decode("ascii")


def big_in_all() -> list[str]:
    """Base64 text of rows within MAX_IMAGE_BYTES each but over MAX_REQUEST_BYTES together (refused before base64
    decoding, so the text need not be an image)."""
    per_row = MAX_IMAGE_BYTES - MIB
    return ["A" * (per_row // 3 * 4)] * (MAX_REQUEST_BYTES // per_row + 1)


LARGE_PNG = png(6000, 6000)  # 36 Mpx (allowed alone: under MAX_PIXELS and MAX_REQUEST_PIXELS), ~140 KB of base64
NOT_AN_IMAGE = base64.b64encode(b"just some text, not a JPEG").decode()
GOOD_AND_BAD = [png(24, 16), NOT_AN_IMAGE, png(16, 24)]  # one bad row among good ones refuses the whole request
MIXED_MESSAGE = ("1 of 3 row(s) have a bad `image` (row 1); the request was refused as a whole, nothing was predicted: "
                 "row 1: `image` bytes are not a readable JPEG/PNG image")
# The `image` column is MLflow's `binary` type: the scoring server decodes each row's base64 text before the model sees
# the request, and refuses text that is not base64 (or a null) itself, naming the column.
NOT_BASE64 = "Failed to convert column image"

# the cases MLflow's scoring server refuses itself, before the model sees the request
MLFLOW_OWN = {"invalid base64", "null image", "missing image column", "wrong content type", "body not JSON"}
# case -> (Server.post keyword arguments, built when the case runs; expected status; fragment of the message)
BAD_REQUESTS: dict[str, tuple[Callable[[], dict[str, Any]], int, str]] = {
    "invalid base64": (lambda: {"payload": frame(["not base64 !!!"])}, 400, NOT_BASE64),
    "not an image": (lambda: {"payload": frame([NOT_AN_IMAGE])}, 400,
                     "row 0: `image` bytes are not a readable JPEG/PNG image"),
    "missing image column": (lambda: {"payload": frame(["aGVsbG8="], column="picture")}, 400,
                             "missing inputs ['image']"),
    "empty frame": (lambda: {"payload": {"dataframe_split": {"columns": ["image"], "data": []}}}, 400,
                    "input frame is empty"),
    "null image": (lambda: {"payload": frame([None])}, 400, NOT_BASE64),
    "empty image": (lambda: {"payload": frame([""])}, 400,
                    "row 0: `image` must be the non-empty bytes of a JPEG or PNG"),
    "too many pixels": (lambda: {"payload": frame([png(8000, 6000, mode="1")])}, 400,
                        f"row 0: image is 8000x6000, more than {MAX_PIXELS:,} pixels"),
    "decompression bomb": (lambda: {"payload": frame([png(20000, 10000, mode="1")])}, 400,
                           f"more than {MAX_PIXELS:,} pixels"),
    "good and bad rows mixed": (lambda: {"payload": frame(GOOD_AND_BAD)}, 400, MIXED_MESSAGE),
    "several bad rows": (lambda: {"payload": frame(["", GOOD_AND_BAD[0], NOT_AN_IMAGE])}, 400,
                         "2 of 3 row(s) have a bad `image` (row 0, 2)"),
    "image too big": (lambda: {"payload": frame([too_big()])}, 400, "row 0: image is larger than 20 MiB"),
    "wrong content type": (lambda: {"data": "image=...", "content_type": "text/plain"}, 415,
                           "This predictor only supports the following content types"),
    "body not JSON": (lambda: {"data": "{not json"}, 400, "valid JSON"),
    "too many rows": (lambda: {"payload": frame([GOOD_AND_BAD[0]] * (MAX_ROWS + 1))}, 400,
                      f"the request has {MAX_ROWS + 1} rows, more than the {MAX_ROWS} allowed per request"),
    "too many pixels in all": (lambda: {"payload": frame([png(6000, 6000, mode="1")] * 3)}, 400,
                               f"the request's 3 images have 108,000,000 pixels to decode in all, more than the "
                               f"{MAX_REQUEST_PIXELS:,} allowed per request"),
    "too many bytes in all": (lambda: {"payload": frame(big_in_all())}, 400,
                              f"MiB in all, more than the {MAX_REQUEST_BYTES // MIB} MiB allowed per request"),
    "GIF": (lambda: {"payload": frame([encoded(8, 8, "GIF")])}, 400,
            "row 0: `image` is a GIF file; only JPEG and PNG images are accepted"),
    "box of 3 numbers": (lambda: {"payload": boxed([GOOD_AND_BAD[0]] * 2, [None, [0, 0, 10]])}, 400,
                         "1 of 2 row(s) have a bad `box` (row 1); the request was refused as a whole, nothing was "
                         "predicted: row 1: `box` must have 4 numbers"),
    "box outside the image": (lambda: {"payload": boxed([GOOD_AND_BAD[0]], [[30, 0, 40, 10]])}, 400,
                              "row 0: box (30, 0, 40, 10) lies outside the 24x16 image"),
    "BMP among good rows": (lambda: {"payload": frame([GOOD_AND_BAD[0], encoded(8, 8, "BMP")])}, 400,
                            "1 of 2 row(s) have a bad `image` (row 1); the request was refused as a whole, nothing "
                            "was predicted: row 1: `image` is a BMP file; only JPEG and PNG images are accepted"),
}


def message(response: requests.Response) -> str:
    """The `message` of a JSON error body, else the whole body."""
    try:
        return response.json()["message"]
    except (ValueError, KeyError, TypeError):
        return response.text


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_4xx_with_a_clear_message(servers: dict[str, Server], case: str) -> None:
    make, status, fragment = BAD_REQUESTS[case]
    response = servers[NET].post(**make())
    assert response.status_code == status, response.text[:1000]
    assert fragment in message(response), response.text[:1000]
    if case not in MLFLOW_OWN:  # carsml's refusals: the sentence that helps first, no echo of the request's bytes
        assert "Failed to predict data" not in response.text and len(response.text) < 1500, response.text[:3000]
    good = servers[NET].post(frame([GOOD_AND_BAD[0]]))  # and the server answers the next request
    assert good.status_code == 200, good.text[:1000]
    check_predictions(good.json()["predictions"], 1)


def test_after_bad_requests_the_server_still_answers_and_the_rf_champion_refuses_them_the_same_way(
        servers: dict[str, Server], shared_data: Path) -> None:
    server, rf = servers[NET], servers[RF]
    for case in ("good and bad rows mixed", "body not JSON", "decompression bomb", "wrong content type"):
        make, status, _ = BAD_REQUESTS[case]
        assert server.post(**make()).status_code == status, case
    good = real_jpegs(shared_data, 2)
    response = server.post(frame(good))
    assert response.status_code == 200, response.text[:1000]
    check_predictions(response.json()["predictions"], 2)
    for case in ("invalid base64", "good and bad rows mixed", "body not JSON", "too many rows", "GIF",
                 "too many pixels in all"):
        make, status, fragment = BAD_REQUESTS[case]
        response = rf.post(**make())
        assert response.status_code == status and fragment in message(response), (case, response.text[:1000])
    check_predictions(rf.post(frame(good)).json()["predictions"], 2)


def timed_post(server: Server, payload: dict[str, Any]) -> tuple[requests.Response, float]:
    start = time.perf_counter()
    response = server.post(payload)
    return response, time.perf_counter() - start


def test_many_large_allowed_images_are_refused_from_their_headers_faster_than_one_is_decoded(
        servers: dict[str, Server]) -> None:
    server = servers[NET]
    ones = [timed_post(server, frame([LARGE_PNG])) for _ in range(2)]  # allowed: decoded and predicted
    for one, _ in ones:
        assert one.status_code == 200, one.text[:1000]
        check_predictions(one.json()["predictions"], 1)
    decode_one = min(seconds for _, seconds in ones)
    abusive = [LARGE_PNG] * MAX_ROWS  # 64 x 36 Mpx: each allowed, ~40 s of decoding together on 2 cores
    refusals = [timed_post(server, frame(abusive)) for _ in range(2)]
    for response, _ in refusals:
        assert response.status_code == 400, response.text[:1000]
        assert (f"the request's {MAX_ROWS} images have {MAX_ROWS * 36_000_000:,} pixels to decode in all, more than "
                f"the {MAX_REQUEST_PIXELS:,} allowed per request") in message(response)
    refused_in = min(seconds for _, seconds in refusals)
    # nothing was decoded: refusing all of them costs less than decoding one (and far less than the server timeout)
    assert refused_in < decode_one and refused_in < 30, (refused_in, decode_one)
    assert server.post(frame([GOOD_AND_BAD[0]])).status_code == 200


def test_after_the_abuse_the_servers_memory_stays_bounded(servers: dict[str, Server]) -> None:
    """The heaviest requests (the largest allowed image, many large images, an image over MAX_IMAGE_BYTES, a request
    over MAX_REQUEST_BYTES) twice each, then the RSS of each server's process group."""
    heavy = [frame([LARGE_PNG]), frame([LARGE_PNG] * MAX_ROWS), frame([too_big()]), frame(big_in_all())]
    for _ in range(2):
        for payload in heavy:
            assert servers[NET].post(payload).status_code in (200, 400)
        assert servers[RF].post(heavy[0]).status_code == 200
    for name, server in servers.items():
        rss = server.rss()
        assert rss > 0, name
        assert rss < SERVER_RSS_BOUND and rss - server.rss_at_start < SERVER_RSS_GROWTH, (
            name, f"RSS {rss / MIB:.0f} MiB, {server.rss_at_start / MIB:.0f} MiB after startup")


# ------------------------------------------------------------------------------------------------------------
# In-process: the thread setting and the order of the checks (no server needed)


def test_serve_threads_comes_from_the_environment_or_the_default() -> None:
    assert serve_threads({}) == default_threads() >= 1
    assert serve_threads({SERVE_THREADS_ENV: " 3 "}) == 3
    assert default_threads(2) == 2 and default_threads(1) == 1 and default_threads(16) == 16
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(MlflowException, match=f"{SERVE_THREADS_ENV}='{bad}' is invalid"):
            serve_threads({SERVE_THREADS_ENV: bad})


def test_no_image_is_decoded_when_any_row_or_budget_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from carsml.tracking import pyfunc_model

    decoded: list[int] = []
    finish = pyfunc_model.finish_image
    monkeypatch.setattr(pyfunc_model, "finish_image", lambda opened, row, size: decoded.append(row) or finish(
        opened, row, size))
    small = png(20, 10)
    for values in ([small, small, encoded(8, 8, "GIF")], [small] + [png(6000, 6000, mode="1")] * 3,
                   [small] * (MAX_ROWS + 1)):
        with pytest.raises(MlflowException, match="nothing was predicted"):
            decode_images(values, 8)
    assert decoded == []
    assert decode_images([small, small], 8).shape == (2, 8, 8, 3) and decoded == [0, 1]


def test_jpegs_count_at_their_reduced_decoding_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    from carsml.tracking import pyfunc_model

    jpeg = encoded(4000, 3000, "JPEG")  # 12 Mpx as stored; 500 x 375 decoded for a 64-px model (1/8 scale)
    assert pyfunc_model.open_image(jpeg, 0, 64).pixels == 500 * 375
    assert pyfunc_model.open_image(png(4000, 3000), 0, 64).pixels == 12_000_000
    monkeypatch.setattr(pyfunc_model, "MAX_REQUEST_PIXELS", 20_000_000)
    assert decode_images([jpeg] * 2, 64).shape == (2, 64, 64, 3)
    with pytest.raises(MlflowException, match="24,000,000 pixels to decode in all"):
        decode_images([png(4000, 3000)] * 2, 64)


def test_an_image_or_box_too_small_for_the_model_is_refused() -> None:
    """A 1x1 image once got a confident label: below 1/8 of the input on its shorter side a row is refused (400),
    naming the row, its size and the minimum; at the minimum it is classified."""
    from carsml.tracking import pyfunc_model

    assert [pyfunc_model.min_side(s) for s in (8, 64, 160, 224)] == [1, 8, 20, 28]
    assert pyfunc_model.open_image(png(20, 80), 0, 160).pixels == 1600  # at the minimum
    with pytest.raises(MlflowException, match=r"row 0: image is 1x1; this model \(64 px input\) needs at least 8 px "
                                              r"on the shorter side"):
        pyfunc_model.open_image(png(1, 1), 0, 64)
    with pytest.raises(MlflowException, match=r"row 3: image is 19x300; this model \(160 px input\) needs at least "
                                              r"20 px"):
        pyfunc_model.open_image(png(19, 300), 3, 160)
    with pytest.raises(MlflowException, match=r"row 1: `box` is 50x7; this model \(64 px input\) needs at least 8"):
        pyfunc_model.open_image(png(100, 100), 1, 64, box=(10, 10, 60, 17))
