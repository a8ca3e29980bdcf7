"""Device selection, mixed-precision policy and seeding: the three environment decisions every run makes."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from carsml.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:<index>", "mps")
AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a device option into a `torch.device`.

    "auto" picks cuda, then mps, then cpu. An explicit device that is unknown or not available here raises
    `ConfigError` rather than silently running somewhere else (a "cuda" run on CPU would take days).
    """
    if not isinstance(name, str):
        raise ConfigError(f"device: expected a string, one of {DEVICE_CHOICES}; got {name!r}")
    key = name.strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "mps":
        if not _mps_available():
            raise ConfigError(
                "device: 'mps' was requested but the MPS backend is not available on this machine"
            )
        return torch.device("mps")
    if key == "cuda" or key.startswith("cuda:"):
        index_text = key.partition(":")[2]
        if key != "cuda" and not index_text.isdigit():
            raise ConfigError(f"device: expected one of {DEVICE_CHOICES}; got {name!r}")
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} was requested but CUDA is not available on this machine")
        if index_text and int(index_text) >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {name!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device(key)
    raise ConfigError(f"device: expected one of {DEVICE_CHOICES}; got {name!r}")


def autocast_dtype(device: torch.device | str, amp: str = "auto") -> torch.dtype | None:
    """The dtype to autocast to on `device`, or None for full float32.

    "auto": bfloat16 on CPU and on GPUs that support it (no loss scaling needed), float16 otherwise (the
    engine then adds a GradScaler). "off" → None; "bf16" / "fp16" force a dtype.
    """
    device = torch.device(device)
    if amp not in AMP_CHOICES:
        raise ConfigError(f"amp: expected one of {AMP_CHOICES}; got {amp!r}")
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        # float16 autocast is the long-supported path on MPS; bf16 depends on the macOS version.
        return torch.float16
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all CUDA devices) and ask cuDNN for deterministic kernels.

    Call it before building the model so the initial weights are reproducible too; `fit` calls it again
    with its config seed so data order, augmentation and dropout are reproducible.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer; got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    # Benchmark mode picks the fastest kernel per shape by timing, which can differ run to run.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # Needed by cuBLAS for deterministic matmuls if a caller enables torch.use_deterministic_algorithms.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
