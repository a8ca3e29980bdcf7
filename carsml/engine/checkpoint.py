"""Atomic checkpoint files, model and option compatibility checks, RNG state capture / restore for exact resumes."""

from __future__ import annotations

import os
import random
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from carsml.errors import CarsmlError

if TYPE_CHECKING:
    from carsml.engine.types import TrainConfig

CHECKPOINT_FORMAT = "carsml-fit-checkpoint"
CHECKPOINT_VERSION = 1
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
# Options a resumed fit may change; any other difference would make the resumed run a different experiment.
RESUME_MUTABLE = frozenset(
    {"epochs", "early_stopping_patience", "device", "eval_batch_size", "log_every_steps"}
)


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, then `os.replace`: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def checkpoint_payload(epoch: int, cfg: TrainConfig, model_state: dict[str, torch.Tensor],
                       **entries: Any) -> dict[str, Any]:
    """What a checkpoint file holds: format, version, `epoch`, the fit's options and `model_state`, then `entries`."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch, "config": asdict(cfg),
            "model": model_state, **entries}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `fit` (tensors land on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CarsmlError(f"checkpoint {path}: file not found; run without resume to start a new fit")
    try:
        # weights_only: checkpoints hold only tensors and plain containers (RNG states are converted to them).
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CarsmlError(f"checkpoint {path}: cannot be read ({exc}); delete it to start a new fit") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CarsmlError(
            f"checkpoint {path}: not a carsml fit checkpoint (expected format {CHECKPOINT_FORMAT!r})"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CarsmlError(
            f"checkpoint {path}: version {payload.get('version')!r}; this carsml reads version "
            f"{CHECKPOINT_VERSION}"
        )
    return payload


def check_compatible(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    """Raise `CarsmlError` when `state_dict` does not fit `model` (missing/unexpected keys, shapes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for what, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", reshaped),
    ):
        if items:
            shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            problems.append(f"{len(items)} {what}: {shown}")
    if problems:
        raise CarsmlError(
            f"checkpoint {source}: was written for a different model ({'; '.join(problems)}); "
            "resume with the same model configuration or start a new fit"
        )


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """Raise `CarsmlError` when `cfg` differs from the options a checkpoint was written with (`saved`) in
    anything but RESUME_MUTABLE (and, with the cosine schedule, whose length depends on it, not in epochs)."""
    now = asdict(cfg)
    mutable = RESUME_MUTABLE - ({"epochs"} if cfg.scheduler == "cosine" else set())
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}"
        for k in (f.name for f in fields(cfg))
        if k not in mutable and saved.get(k) != now[k]
    ]
    if diffs:
        raise CarsmlError(
            f"checkpoint {path}: written with other training options ({'; '.join(diffs)}); resume with "
            "the same options or start a new fit"
        )


def load_resume_checkpoint(path: Path, model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """Read `path` (a fit's last.pt), checked to fit `model` and to be written with `cfg`'s options."""
    ckpt = load_checkpoint(path)
    check_compatible(model, ckpt["model"], path)
    check_resume_config(cfg, ckpt["config"], path)
    return ckpt


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state a training step can touch, in a form `torch.load(weights_only=True)` accepts."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Put back the RNG states saved by `capture_rng`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's state dict (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
