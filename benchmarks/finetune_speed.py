"""Fine-tuning speed: carsml's training images/s (through `fit`, with the finetune recipe's augmentation) against a bare
forward/backward/step of the same model and size, eager and under `torch.compile`.

    python benchmarks/finetune_speed.py [--model efficientnet_lite0] [--size 160] [--batch-size 32] [--repeats 3]

The compiled step is checked against the eager one first (the same losses over a few steps from the same weights, to
bf16 tolerance); `torch.compile` would be worth adopting for training where it is correct and >= 1.15x the eager step.
Writes docs/performance.md (section finetune_speed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_vs_compute import compute_only, end_to_end  # noqa: E402
from report import machine, write_section  # noqa: E402

from carsml.engine.device import autocast_dtype, resolve_device  # noqa: E402
from carsml.engine.evaluate import autocast_context  # noqa: E402
from carsml.experiments.train import engine_config  # noqa: E402
from carsml.models.factory import create_model  # noqa: E402

CLASSES = 60


def losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, amp: str) -> list[float]:
    """The training losses of `steps` AdamW steps on one batch (the check that a compiled step computes the same)."""
    device = x.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = []
    for _ in range(steps):
        with autocast_context(device, autocast_dtype(device, amp)):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(float(loss))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = engine_config(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, optimizer="adamw",
                        device=args.device)
    steps = args.images // args.batch_size
    shape = (args.batch_size, 3, args.size, args.size)

    def model() -> torch.nn.Module:
        return create_model(args.model, CLASSES, args.size, seed=0)

    e2e = statistics.median(end_to_end(args.model, {}, cfg, args.size, args.images, CLASSES, "crop", 1.0)
                            for _ in range(args.repeats))
    eager = statistics.median(compute_only(model(), cfg, shape, CLASSES, steps) for _ in range(args.repeats))
    start = time.perf_counter()
    compiled_ips = statistics.median(compute_only(torch.compile(model()), cfg, shape, CLASSES, steps)
                                     for _ in range(args.repeats))
    compile_wall = time.perf_counter() - start
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (args.batch_size,), device=device)
    reference = model().to(device, memory_format=torch.channels_last)
    twin = copy.deepcopy(reference)
    want = losses(reference, x, y, 5, "auto")
    got = losses(torch.compile(twin), x, y, 5, "auto")
    worst = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(want, got, strict=True))
    correct = worst < 0.05
    speedup = compiled_ips / eager
    verdict = ("adopt it" if correct and speedup >= 1.15 else
               "not adopted: " + ("it computes other losses" if not correct else f"{speedup:.2f}x is below 1.15x"))
    body = f"""## Fine-tuning: carsml's training images/s against a bare step, and torch.compile

`python benchmarks/finetune_speed.py --model {args.model} --size {args.size} --batch-size {args.batch_size}` on
{device}; {machine()}. {args.model}, {args.size} px, batch {args.batch_size}, AdamW, AMP
`{autocast_dtype(device, "auto")}`, channels_last. carsml = the training-pass images/s `fit` reports (uint8 batches from
the cache → the finetune recipe's `crop` augmentation → forward/backward/step), median over epochs 2..{args.epochs} and
{args.repeats} repeats; bare step = the same model and optimizer stepping on random tensors already on the device.

| what | images/s | ÷ bare eager step |
|---|---|---|
| carsml fine-tuning (`fit`, recipe finetune's augmentation) | {e2e:,.1f} | **{e2e / eager:.2f}** |
| bare forward/backward/step, eager | {eager:,.1f} | 1.00 |
| bare forward/backward/step, `torch.compile` (default mode) | {compiled_ips:,.1f} | **{speedup:.2f}** |

torch.compile: the losses of 5 steps from the same weights differ by at most {worst:.1%} from the eager ones
({'the same computation' if correct else 'NOT the same'}); compiling and timing took {compile_wall:.0f} s; {verdict}.
"""
    print(body)
    print("wrote", write_section("finetune_speed", body))


if __name__ == "__main__":
    main()
