"""Images/s of an epoch read from the decoded cache vs one decoding the JPEGs every epoch (PIL, as the original
notebooks did: open, convert RGB, resize, to tensor), on the real JPEGs in ../shared/data/stanford_cars/sample.

    python benchmarks/cache_vs_jpeg.py [--size 224] [--repeats 5]

Writes the ratio to docs/performance.md. Goal: >= 10x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from carsml.data.cache import build_cache  # noqa: E402
from carsml.data.table import make_table  # noqa: E402
from carsml.engine.loader import ArrayData, iterate_batches  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford_cars" / "sample"


def jpeg_epoch(paths: list[str], size: int, batch_size: int) -> int:
    """One epoch the notebook way: decode every JPEG, RGB, resize, stack into float batches."""
    seen = 0
    for i in range(0, len(paths), batch_size):
        batch = []
        for p in paths[i : i + batch_size]:
            with Image.open(p) as img:
                arr = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))
            batch.append(torch.from_numpy(arr).permute(2, 0, 1).float().div_(255))
        seen += len(torch.stack(batch))
    return seen


def cache_epoch(data: ArrayData, batch_size: int, generator: torch.Generator) -> int:
    """One epoch from the decoded cache as `fit` reads it: shuffled uint8 memmap batches handed to the device (the
    float conversion and normalisation happen inside the batched augmentation, on the GPU where there is one)."""
    seen = 0
    for x, _ in iterate_batches(data, batch_size, shuffle=True, generator=generator, device="cpu"):
        seen += len(x)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-scale", type=float, default=1.5,
                        help="also measure the training cache of the carsml recipe (side = size x this)")
    args = parser.parse_args()
    index = pd.read_csv(SAMPLE / "sample_index.csv")
    paths = [str(SAMPLE / "cars_train_bbox_cropped" / f) for f in index["fname"]]
    table = make_table([{"path": p, "label": 0, "class_name": "x", "x1": 0, "y1": 0, "x2": int(w), "y2": int(h),
                         "split": "train", "fname": Path(p).name}
                        for p, w, h in zip(paths, index["crop_width"], index["crop_height"], strict=True)])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        decoded = build_cache(table, args.size, cache_dir=Path(tmp))
        build_seconds = time.perf_counter() - t0
        data = ArrayData(decoded.images, decoded.labels)
        large_side = round(args.size * args.cache_scale)
        large = build_cache(table, large_side, cache_dir=Path(tmp))
        large_data = ArrayData(large.images, large.labels)
        gen = torch.Generator().manual_seed(0)
        jpeg, cached, cached_large = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n = jpeg_epoch(paths, args.size, args.batch_size)
            jpeg.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            n = cache_epoch(data, args.batch_size, gen)
            cached.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            n = cache_epoch(large_data, args.batch_size, gen)
            cached_large.append(n / (time.perf_counter() - t0))
    jpeg_ips, cache_ips, large_ips = statistics.median(jpeg), statistics.median(cached), statistics.median(cached_large)
    body = f"""## Decoded cache vs decoding JPEGs every epoch

`python benchmarks/cache_vs_jpeg.py --size {args.size} --repeats {args.repeats} --cache-scale {args.cache_scale}`
on the {len(paths)} real Stanford Cars JPEGs in `shared/data/stanford_cars/sample` (bbox crops of varying sizes),
batch {args.batch_size}, {machine()}.

| loader | images/s (median of {args.repeats}) |
|---|---|
| PIL: decode + RGB + resize every epoch (the original notebooks) | {jpeg_ips:,.0f} |
| carsml decoded cache (memmap uint8, shuffled batches, as `fit` reads them) | {cache_ips:,.0f} |
| **ratio** | **{cache_ips / jpeg_ips:.1f}x** (goal >= 10x) |
| carsml recipe's training cache at {large_side} px (`cache_scale` {args.cache_scale}) | {large_ips:,.0f} |
| **ratio** | **{large_ips / jpeg_ips:.1f}x** |

The notebook loader hands float tensors to the model (ToTensor on the CPU); carsml hands uint8 batches to the device
and converts them inside the batched augmentation (on the GPU where there is one), so each side is measured up to the
point where its batch is ready for the device. These sample JPEGs are already cropped to their boxes; full-size
originals decode slower still, so the real-data ratio is higher.

Building the cache once (decode, crop, resize; {len(paths)} images) took {build_seconds:.2f} s — it pays for itself
within the first epoch and is reused by every later epoch, fold and experiment.
"""
    print(body)
    print("wrote", write_section("cache_vs_jpeg", body))


if __name__ == "__main__":
    main()
