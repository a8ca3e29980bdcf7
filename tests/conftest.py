"""Shared fixtures: every test gets its own SQLite tracking store and working directory; the decoded-image cache and
the synthetic datasets are shared per session (generated once)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "stanford_cars"

# a tiny configuration that exercises the real code paths in seconds
TINY = {"synth_classes": 4, "synth_images_per_class": 16, "image_size": 32, "head_widths": "64,32",
        "epochs": 2, "batch_size": 32, "device": "cpu"}


# What a different machine of this kind can change, applied to the whole suite to check that no verdict hangs on it:
#   CARSML_TEST_VARIANT="amp=off,threads=2,seed=7" pytest -n 2
# amp      the mixed-precision default of every in-process run (`auto`, i.e. bf16 on CPU, unless set): off | bf16 | auto
# threads  torch intra-op threads per test process (default: the cores shared out among the xdist workers)
# seed     the seed of the shared trained fixtures (and TINY runs): another model, other mistakes
# docs/testing.md lists the variants CI-equivalent runs were checked under.
VARIANT_KEYS = {"amp": ("auto", "off", "bf16"), "threads": None, "seed": None}


def parse_variant(text: str) -> dict[str, str]:
    """`key=value,key=value` of CARSML_TEST_VARIANT, checked (an unknown key or value stops the run)."""
    variant: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        choices = VARIANT_KEYS.get(key, ())
        if not sep or key not in VARIANT_KEYS or (choices and value not in choices) or (
                choices is None and not value.isdigit()):
            raise pytest.UsageError(f"CARSML_TEST_VARIANT: bad item {item!r}; expected amp=auto|off|bf16, "
                                    f"threads=<int>, seed=<int>, comma-separated")
        variant[key] = value
    return variant


VARIANT = parse_variant(os.environ.get("CARSML_TEST_VARIANT", ""))


def _apply_amp_variant(amp: str) -> None:
    """Make `amp` the default of every in-process run, before any test module binds `load_config`."""
    from carsml import config

    load_config = config.load_config

    def with_variant(name: str, overrides: dict | None = None, **kwargs: bool) -> dict:
        cfg = load_config(name, overrides, **kwargs)
        if cfg.get("amp") == "auto" and "amp" not in (overrides or {}):
            cfg["amp"] = amp
        return cfg

    config.load_config = with_variant


def pytest_configure(config: pytest.Config) -> None:
    import torch

    if "threads" in VARIANT:
        torch.set_num_threads(int(VARIANT["threads"]))
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        # With pytest-xdist each worker process gets one core's worth of torch threads (2 workers on 2 cores).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    if VARIANT.get("amp", "auto") != "auto":
        _apply_amp_variant(VARIANT["amp"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip cleanly on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device (benchmarks/gpu_check.sh runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    import torch

    return f"carsml test variant: {VARIANT or 'default'} (torch threads {torch.get_num_threads()})"


# processes a test module may leave to the end of the session: multiprocessing's own helper (spawned workers start it)
LONG_LIVED = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@pytest.fixture(autouse=True, scope="module")
def no_process_left_behind() -> Iterator[None]:
    """After each test module: no process it started (servers, torchrun, workers) is still running."""
    import psutil

    yield
    me = psutil.Process()
    deadline = time.monotonic() + 15  # a process being stopped gets a moment to exit
    while True:
        alive = []
        for child in me.children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE and not any(
                        name in " ".join(child.cmdline()) for name in LONG_LIVED):
                    alive.append(" ".join(child.cmdline())[:200])
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive, f"processes left behind by this module: {alive}"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("carsml-cache")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_dir: Path) -> Path:
    monkeypatch.setenv("CARSML_CACHE", str(cache_dir))
    import mlflow

    mlflow.set_tracking_uri(None)  # forget a URI set explicitly by an earlier test (this also unsets the variable)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real Stanford Cars annotations not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, str]:
    """A session-wide tracking store holding one tiny trained `improved` run (trained once, shared by the tests that
    analyse a trained model). Returns {"uri", "run_id", "cwd"}."""
    import mlflow

    from carsml.cli import run_experiment

    folder = tmp_path_factory.mktemp("trained-store")
    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARSML_CACHE", str(cache_dir))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.chdir(folder)
        trained = run_experiment("improved", {**TRAINED_RUN, "device": "cpu"})
        run_id = mlflow.last_active_run().info.run_id
    assert trained.model_uri
    return {"uri": uri, "run_id": run_id, "cwd": str(folder)}


# the shared trained run: 6 classes, 32 px, small head; 30 epochs reach ~80% test accuracy (10 gave ~45%, too
# close to chance for analyses such as TTA to be meaningful)
TRAINED_RUN = {"synth_classes": 6, "synth_images_per_class": 40, "image_size": 32, "head_widths": "128,64",
               "epochs": 30, "batch_size": 16, "lr": 0.001,
               **({"seed": int(VARIANT["seed"])} if "seed" in VARIANT else {})}


@pytest.fixture
def trained_run(trained_store: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Run id of the shared trained `improved` run; the test's tracking URI points at its store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_store["uri"])
    return trained_store["run_id"]


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tracking store for a test module (creating an SQLite store takes seconds); tests use their own experiment."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('module-store')}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the schema once
    return uri


def use_module_store(store: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, prefix: str) -> str:
    """Point this test at the module's store; return an experiment name of its own."""
    from carsml.tracking.runs import setup_tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    setup_tracking()  # mlflow keeps the URI it was last given; follow this test's MLFLOW_TRACKING_URI
    return prefix + "".join(c if c.isalnum() else "-" for c in request.node.name)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path, startup_s: float = 180, proxy: bool = True) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend in `folder`, artifacts proxied into `folder/artifacts`, as
    docs/tracking.md starts it; `proxy=False`: clients write `folder/artifacts` themselves, `--no-serve-artifacts`);
    yields its URL and stops its whole process group afterwards, whatever happens."""
    port = free_port()
    bin_dir = Path(sys.executable).parent  # mlflow and its gunicorn/uvicorn from the venv
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = folder / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/server.db",
             *(["--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts"] if proxy else
               ["--default-artifact-root", str(folder / "artifacts"), "--no-serve-artifacts"]),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_s
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline, "mlflow server did not start: " + log_path.read_text()[-3000:]
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`'s process group (started with start_new_session=True) and every process it started, also
    those in sessions of their own (torchrun starts its workers so): a machine that dies takes them all."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def kill_when(proc: subprocess.Popen, ready: Callable[[], str | None], timeout_s: float = 900) -> str | None:
    """Poll `ready()` until it returns a run id, then SIGKILL `proc` and everything it started (`kill_tree`);
    returns that run id, or None when the process ended or the deadline passed first. The deadline is only a
    ceiling for a stuck process: a slow machine just takes longer."""
    deadline, run_id = time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            run_id = ready()
            if run_id:
                kill_tree(proc)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        proc.wait(timeout=30)
    return run_id
