"""End-to-end training images/s (decoded-cache batches → batched augmentation → step, through `fit`) against pure
forward/backward/optimizer images/s on random tensors of the same shape already on the device.

    python benchmarks/pipeline_vs_compute.py [--size 64] [--repeats 3]

The ratio (goal >= 0.9) says whether the input pipeline and logging are a bottleneck. Writes docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from carsml.data.transforms import build_transform  # noqa: E402
from carsml.engine.device import autocast_dtype, resolve_device  # noqa: E402
from carsml.engine.evaluate import autocast_context  # noqa: E402
from carsml.engine.loader import ArrayData  # noqa: E402
from carsml.engine.optim import make_optimizer  # noqa: E402
from carsml.engine.train import fit  # noqa: E402
from carsml.engine.types import TrainConfig  # noqa: E402
from carsml.experiments.train import engine_config  # noqa: E402
from carsml.models.factory import create_model, resolve_data_config  # noqa: E402

MODELS = {  # name -> create_model options
    "baseline_cnn": {"head_widths": (2048, 1024, 512, 256)},
    "resnet18": {},
}
PIPELINES = {  # name -> (augmentation policy, cache side / input side)
    "study: flip, rotation, jitter; cache = input size": ("study", 1.0),
    "carsml recipe: mild crop + rotation from a 1.5x cache, flip, jitter": ("crop", 1.5),
}


def compute_only(model: torch.nn.Module, cfg: TrainConfig, shape: tuple[int, ...], classes: int, steps: int) -> float:
    """Images/s of forward + backward + optimizer steps (fit's optimizer) on random normalised tensors already on the
    device."""
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(device, cfg.amp)
    model.to(device).train()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, [{"params": list(model.parameters())}])  # fit's own optimizer (fused kernel)
    x = torch.randn(shape, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (shape[0],), device=device)

    def step() -> None:
        with autocast_context(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * shape[0] / (time.perf_counter() - t0)


def end_to_end(name: str, opts: dict, cfg: TrainConfig, size: int, n: int, classes: int, policy: str,
               cache_scale: float) -> float:
    """Median training-pass images/s over the epochs of a real `fit` (first epoch excluded as warm-up); the training
    images are cached at `cache_scale` x `size`, the augmentation produces `size`."""
    rng = np.random.default_rng(0)
    side = round(size * cache_scale)
    data = ArrayData(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), rng.integers(0, classes, n))
    val = ArrayData(rng.integers(0, 256, (cfg.batch_size, size, size, 3), dtype=np.uint8),
                    rng.integers(0, classes, cfg.batch_size))
    model = create_model(name, classes, size, **opts)
    dc = resolve_data_config(model)
    result = fit(model, data, val, cfg,
                 train_transform=build_transform(policy, size=size, mean=dc["mean"], std=dc["std"]),
                 eval_transform=build_transform("none", size=size, mean=dc["mean"], std=dc["std"]))
    return statistics.median(h["images_per_second"] for h in result.history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    classes = 20
    rows = []
    for name, opts in MODELS.items():
        cfg = engine_config(epochs=args.epochs, batch_size=args.batch_size, lr=1e-4, device=args.device)
        steps = args.images // args.batch_size
        pure = [compute_only(create_model(name, classes, args.size, **opts), cfg,
                             (args.batch_size, 3, args.size, args.size), classes, steps) for _ in range(args.repeats)]
        pure_ips = statistics.median(pure)
        for pipeline, (policy, scale) in PIPELINES.items():
            e2e = [end_to_end(name, opts, cfg, args.size, args.images, classes, policy, scale)
                   for _ in range(args.repeats)]
            e2e_ips = statistics.median(e2e)
            rows.append(f"| {name} | {pipeline} | {e2e_ips:,.0f} | {pure_ips:,.0f} | **{e2e_ips / pure_ips:.2f}** |")
            print(rows[-1], flush=True)
    device = resolve_device(args.device)
    body = f"""## Input pipeline vs compute (training)

`python benchmarks/pipeline_vs_compute.py --size {args.size} --repeats {args.repeats}`: {args.images} uint8 images of
{args.size} px, batch {args.batch_size}, per-sample augmentation (the study's; the recipe's from a larger cache), AMP
`{autocast_dtype(device, "auto")}`, channels_last, on {device}; {machine()}. End to end = the training-pass images/s
that `fit` itself reports (memmap batches with background prefetch → augmentation → forward/backward/step), median over
epochs 2..{args.epochs} and {args.repeats} repeats; compute = the same model, optimizer and precision stepping on random
tensors already on the device.

| model | pipeline | end-to-end images/s | compute-only images/s | ratio (goal >= 0.9) |
|---|---|---|---|---|
""" + "\n".join(rows) + """

On the CPU the augmentation competes with the model for the same two cores, so the ratio there is a lower bound of
what a GPU machine (augmentation on the GPU, prefetch thread on the CPU) shows.
"""
    print("wrote", write_section("pipeline_vs_compute", body))


if __name__ == "__main__":
    main()
