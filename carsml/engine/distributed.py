"""DistributedDataParallel: what `fit` needs when `torchrun` started several processes.

`torchrun --nproc-per-node N -m carsml improved ...` starts N copies of the same command with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT set. Each process trains one replica of the model: the same global batches
(one permutation, drawn from the same seeded generator everywhere), each process its own `1/N` share of every batch,
gradients averaged by DDP's all-reduce, so N processes x batch B/N train like one process x batch B. BatchNorm is
synchronised across processes on CUDA (`SyncBatchNorm`; PyTorch has no CPU kernel for it, so on CPU each process
normalises its own share). Rank 0 alone writes checkpoints and reports to callbacks (and so to MLflow).

Backends: NCCL on CUDA (one GPU per process, `cuda:LOCAL_RANK`), gloo on CPU. One process (no WORLD_SIZE, or 1):
everything here is a no-op and `fit` is the single-process loop.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from carsml.errors import CarsmlError, ConfigError

# How long a process waits for the others: to form the group (processes that never meet fail, not hang), and in every
# collective (replicas wait there while rank 0 decodes the cache or evaluates a large test set). A multi-machine
# rendezvous is torchrun's own, before carsml starts: `--rdzv-conf join_timeout=SECONDS` bounds it.
TIMEOUT_S = int(os.environ.get("CARSML_DIST_TIMEOUT", "1800"))


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that checkpoints, reports and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The process group torchrun describes in the environment (one process when it describes none)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("WORLD_SIZE / RANK / LOCAL_RANK: expected integers (as torchrun sets them); got "
                          f"{os.environ.get('WORLD_SIZE')!r} / {os.environ.get('RANK')!r} / "
                          f"{os.environ.get('LOCAL_RANK')!r}") from None
    return World(rank, size, local)


def device_for(name: str, here: World) -> str:
    """The device option of this process: under DDP on CUDA, `cuda:LOCAL_RANK` (one GPU per process)."""
    if not here.distributed or not (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        return name
    count = torch.cuda.device_count()
    if here.local_rank >= count:
        raise ConfigError(f"torchrun started {here.size} processes on this machine (local rank {here.local_rank}) "
                          f"but it has {count} CUDA device(s): pass --nproc-per-node {count} or fewer")
    return f"cuda:{here.local_rank}"


def init(device: torch.device) -> World:
    """Join the process group (once): NCCL for CUDA devices, gloo otherwise. A group that does not form within
    TIMEOUT_S (CARSML_DIST_TIMEOUT) raises a CarsmlError naming the address, instead of waiting for ever."""
    here = world()
    if not here.distributed or dist.is_initialized():
        return here
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    except (RuntimeError, ValueError) as exc:  # DistStoreError is a RuntimeError
        raise CarsmlError(f"rank {here.rank} of {here.size}: the process group at {where} ({backend}) did not form "
                          f"within {TIMEOUT_S} s (CARSML_DIST_TIMEOUT; {exc}); start every process with the same "
                          "torchrun --rdzv-endpoint / --nnodes (docs/scaling.md)") from None
    return here


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over the processes (the values themselves with one process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_main(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's `values` on every process, so decisions made from them (best epoch, early stop, plateau) agree."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def share(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every process: what a replica needs to follow rank 0, e.g. the
    next fold's checkpoint folder or the next trial's parameters (`value` itself with one process)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Stopped(CarsmlError):
    """Raised in a replica when rank 0 stopped its fit after an epoch (a callback raised, e.g. a pruned trial)."""


def stop_with_main(stop: bool, device: torch.device) -> bool:
    """After each epoch: whether rank 0 stops the fit (`stop` on rank 0), on every process, so the replicas leave
    the loop with it instead of waiting in the next all-reduce."""
    return bool(from_main([1.0 if stop else 0.0], device)[0])


def barrier() -> None:
    """Wait for every process (no-op with one)."""
    if dist.is_initialized():
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` as a DDP replica (BatchNorm synchronised on CUDA); the model itself with one process."""
    if not dist.is_initialized():
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def check_config(batch_size: int, freeze_backbone_epochs: int, here: World) -> None:
    """What DDP needs of a training config: a global batch that splits evenly over the processes, and every
    trainable parameter trained in every step (DDP's all-reduce expects the same parameters each step)."""
    if not here.distributed:
        return
    if batch_size % here.size:
        raise ConfigError(f"batch_size={batch_size} is the global batch of {here.size} processes and must divide "
                          f"evenly among them: pass a multiple of {here.size}")
    if freeze_backbone_epochs:
        raise ConfigError(f"freeze_backbone_epochs={freeze_backbone_epochs}: a backbone frozen for some epochs is not "
                          "supported with several processes (DDP); pass 0, or train in one process")


def finish() -> None:
    """Leave the process group (at the end of the command)."""
    if dist.is_initialized():
        dist.destroy_process_group()

