"""In-memory / memmap image arrays and a batch iterator that keeps the accelerator fed.

The decoded cache stores images as one uint8 (N, H, W, 3) array (usually a `np.memmap`) plus int64 labels.
A DataLoader with worker processes is unnecessary for that layout: one sorted fancy-indexing read per batch
is a handful of large sequential reads, and a single background thread overlaps it with the training step.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from carsml.errors import ConfigError, DataError


@dataclass
class ArrayData:
    """Images (uint8, N×H×W×3, ndarray or memmap) and labels (int64, N), optionally viewed through `index`.

    `index` selects (and orders) rows of the underlying arrays, so train / validation subsets share one
    memmap without copying it. Positions passed to `subset` / `read` are relative to the current view.
    """

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
            shape = getattr(images, "shape", None)
            raise DataError(
                f"ArrayData.images: expected a uint8 array of shape (N, H, W, 3); got shape {shape}"
            )
        if images.dtype != np.uint8:
            raise DataError(f"ArrayData.images: expected dtype uint8; got {images.dtype}")
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"ArrayData.labels: expected shape ({images.shape[0]},) like the images; got {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"ArrayData.labels: expected integer class indices; got dtype {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise DataError(f"ArrayData.labels: expected labels >= 0; got minimum {labels.min()}")
        self.labels = labels.astype(np.int64, copy=False)
        if self.index is not None:
            self.index = self._check_positions(np.asarray(self.index), images.shape[0], "index")

    @staticmethod
    def _check_positions(idx: np.ndarray, size: int, what: str) -> np.ndarray:
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise DataError(
                f"ArrayData.{what}: expected a 1-D array of integer positions; got {idx.dtype} {idx.shape}"
            )
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise DataError(
                f"ArrayData.{what}: positions must lie in [0, {size}); got range [{idx.min()}, {idx.max()}]"
            )
        return idx

    def __len__(self) -> int:
        return int(self.index.shape[0]) if self.index is not None else int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def targets(self) -> np.ndarray:
        """Labels of the rows in this view, in view order."""
        return self.labels if self.index is None else self.labels[self.index]

    def subset(self, idx: np.ndarray) -> ArrayData:
        """A view of the rows at `idx` (positions relative to this view), sharing the underlying arrays."""
        idx = self._check_positions(np.asarray(idx), len(self), "subset")
        absolute = idx if self.index is None else self.index[idx]
        return ArrayData(self.images, self.labels, absolute)

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, H, W, 3) and labels (B,) at `positions` of this view, in the order given."""
        positions = np.asarray(positions, dtype=np.int64)
        absolute = positions if self.index is None else self.index[positions]
        return _read_rows(self.images, absolute), self.labels[absolute]


def check_fit_splits(train: ArrayData, val: ArrayData | None, test: ArrayData | None) -> None:
    """`fit`'s data: ArrayData splits (val and test optional), none empty, val and test of one image size."""
    for name, data in (("train", train), ("val", val), ("test", test)):
        if data is None and name != "train":
            continue
        if not isinstance(data, ArrayData):
            raise DataError(f"fit: {name} must be an ArrayData; got {type(data).__name__}")
        if len(data) == 0:
            raise DataError(f"fit: the {name} set is empty")
    shapes = {name: d.image_shape for name, d in (("val", val), ("test", test)) if d is not None}
    if len(set(shapes.values())) > 1:
        raise DataError(f"fit: val and test must have the same image size; got {shapes}")


def check_fit_labels(num_classes: int, splits: dict[str, ArrayData | None]) -> None:
    """Every label of the (non-None) `splits` names one of the model's `num_classes` outputs."""
    for name, data in splits.items():
        if data is not None and int(data.targets.max()) >= num_classes:
            raise DataError(
                f"fit: the {name} labels go up to {int(data.targets.max())} but the model predicts "
                f"{num_classes} classes"
            )


def _read_rows(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Read `rows` of a (memmapped) array quickly and return them in the requested order.

    A memmap read is fastest with increasing row numbers (sequential I/O, one pass), and fastest of all as
    a plain slice, so read sorted and undo the sort in memory.
    """
    if rows.size == 0:
        return np.empty((0, *images.shape[1:]), dtype=images.dtype)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    first, last = int(sorted_rows[0]), int(sorted_rows[-1])
    if last - first + 1 == rows.size and np.all(np.diff(sorted_rows) == 1):
        block = np.array(images[first : last + 1])  # np.array copies: a memmap slice is a lazy read-only view
    else:
        block = images[sorted_rows]
    if np.all(order[:-1] < order[1:]):  # already in the requested order
        return block
    out = np.empty_like(block)
    out[order] = block
    return out


def batch_positions(
    n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, drop_last: bool = False,
    share: tuple[int, int] = (0, 1),
) -> list[np.ndarray]:
    """The positions of each batch of one pass over `n` samples (a permutation when `shuffle`). `share=(rank,
    size)`: this process's part of every batch (every `size`-th position from `rank`), the batches being the same
    global batches in every process (DistributedDataParallel)."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size: expected a positive integer; got {batch_size}")
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n, dtype=np.int64)
    stop = n - n % batch_size if drop_last else n
    rank, size = share
    return [order[i : i + batch_size][rank::size] for i in range(0, stop, batch_size)]


def _to_device(
    images: Tensor, labels: Tensor, device: torch.device, channels_last: bool
) -> tuple[Tensor, Tensor]:
    non_blocking = images.is_pinned()
    # NHWC memory permuted to NCHW *is* the channels_last layout: keep it as is when asked for channels_last
    # (no copy at all) and make it contiguous on the device otherwise (faster there than on the host).
    x = images.permute(0, 3, 1, 2).to(device, non_blocking=non_blocking)
    if not channels_last:
        x = x.contiguous()
    return x, labels.to(device, non_blocking=non_blocking)


def iterate_batches(
    data: ArrayData,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    device: torch.device | str,
    drop_last: bool = False,
    channels_last: bool = False,
    prefetch: bool = True,
    share: tuple[int, int] = (0, 1),
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (uint8 N×C×H×W images, int64 labels) batches on `device`.

    The permutation is drawn from `generator` up front (so the data order depends on nothing else). On CUDA
    the host tensors are pinned and copied with `non_blocking=True`. With `prefetch`, the next batch is read
    in a background thread while the caller works on the current one. `share`: see `batch_positions`.
    """
    device = torch.device(device)
    batches = batch_positions(
        len(data), batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last, share=share
    )
    pin = device.type == "cuda"

    def load(positions: np.ndarray) -> tuple[Tensor, Tensor]:
        images, labels = data.read(positions)
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    if not batches:
        return
    if not prefetch:
        for positions in batches:
            yield _to_device(*load(positions), device, channels_last)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="carsml-prefetch") as pool:
        pending = pool.submit(load, batches[0])
        for i in range(len(batches)):
            x, y = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(load, batches[i + 1])
            yield _to_device(x, y, device, channels_last)
