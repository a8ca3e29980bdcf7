"""The CUDA path (marked `gpu`: skipped without a CUDA device; `benchmarks/gpu_check.sh` runs them on one): training
with AMP and channels_last on the GPU, evaluation that agrees with the CPU, exact resume, and DDP over NCCL when
the machine has two GPUs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from carsml.data.transforms import build_transform
from carsml.engine.evaluate import evaluate
from carsml.engine.loader import ArrayData
from carsml.engine.train import fit
from carsml.experiments.train import engine_config
from carsml.models.factory import create_model, resolve_data_config
from tests.conftest import REPO
from tests.test_promote import write_colour_dataset

pytestmark = pytest.mark.gpu

SIZE, CLASSES = 32, 4


def data(n: int, seed: int) -> ArrayData:
    """Images whose class is their mean brightness band: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    images = (labels[:, None, None, None] * 60 + rng.integers(0, 40, (n, SIZE, SIZE, 3))).astype(np.uint8)
    return ArrayData(images, labels)


def tiny() -> torch.nn.Module:
    return create_model("baseline_cnn", CLASSES, SIZE, head_widths=(32,), seed=0)


def transforms(model: torch.nn.Module) -> dict:
    dc = resolve_data_config(model)
    return {"train_transform": build_transform("study", size=SIZE, mean=dc["mean"], std=dc["std"]),
            "eval_transform": build_transform("none", size=SIZE, mean=dc["mean"], std=dc["std"])}


def test_training_on_cuda_with_amp_and_channels_last_learns_and_evaluates_like_the_cpu() -> None:
    model = tiny()
    cfg = engine_config(epochs=4, batch_size=16, lr=3e-3, device="cuda", amp="auto", channels_last=True)
    result = fit(model, data(256, 0), data(64, 1), cfg, **transforms(model))
    assert all(np.isfinite(h["train_loss"]) for h in result.history) and result.best_val_acc > 0.5
    assert next(model.parameters()).device.type == "cuda"
    eval_tf = transforms(model)["eval_transform"]
    on_gpu = evaluate(model, data(64, 2), eval_tf, batch_size=32, device="cuda", amp="off", channels_last=True)
    on_cpu = evaluate(model.cpu(), data(64, 2), eval_tf, batch_size=32, device="cpu", amp="off", channels_last=False)
    assert (on_gpu.preds == on_cpu.preds).mean() >= 0.95  # float32 on both: kernels differ, decisions do not
    assert abs(on_gpu.loss - on_cpu.loss) < 1e-3


def test_a_resumed_cuda_fit_continues_where_it_stopped(tmp_path: Path) -> None:
    cfg = engine_config(epochs=4, batch_size=16, lr=3e-3, device="cuda", amp="bf16")
    whole = fit(tiny(), data(128, 0), data(32, 1), cfg, **transforms(tiny()), checkpoint_dir=tmp_path / "a")
    fit(tiny(), data(128, 0), data(32, 1), dataclasses.replace(cfg, epochs=2), **transforms(tiny()),
        checkpoint_dir=tmp_path / "b")
    resumed = fit(tiny(), data(128, 0), data(32, 1), cfg, **transforms(tiny()), checkpoint_dir=tmp_path / "b",
                  resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(whole.history, resumed.history, strict=True):  # cuDNN deterministic kernels: the same curve
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs")
def test_ddp_over_nccl_on_two_gpus_makes_one_run(tmp_path: Path) -> None:
    colours = write_colour_dataset(tmp_path / "colours", train_per_class=16)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CARSML_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO)}
    args = ["--data", str(colours), "--image-size", "32", "--head-widths", "32", "--epochs", "3", "--batch-size",
            "8", "--device", "cuda", "--nproc", "2", "--experiment-name", "ddp-gpu", "--system-metrics", "false"]
    done = subprocess.run([sys.executable, "-m", "carsml", "improved", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp-gpu").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["carsml.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc")] == [1, 2, 3]
    mlflow.set_tracking_uri(None)
