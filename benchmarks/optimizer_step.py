"""What one optimizer step costs: torch's default kernel against the fused one carsml uses, beside a training step.

    python benchmarks/optimizer_step.py [--size 96] [--batch-size 64] [--repeats 20]

On the CPU torch's default Adam / AdamW / SGD loop over the parameter tensors, op by op; the fused kernel
(`carsml.engine.optim.make_optimizer`) updates them in one pass with the same rule. Measured for the models of the
real-dev benchmark (resnet18, improved_cnn) with AdamW, the recipe's optimizer, side by side in one run: the step
alone, and its share of a whole training step (forward + backward + step at the benchmark's batch and size).
Writes docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from carsml.models.factory import create_model  # noqa: E402

KERNELS = {"torch default": {"foreach": False}, "foreach": {"foreach": True}, "fused (carsml)": {"fused": True}}
CLASSES = 20


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of `fn` in milliseconds, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def measure(name: str, size: int, batch: int, repeats: int) -> list[str]:
    """Table rows for one model: each kernel's step time, and the whole training step with it."""
    model = create_model(name, CLASSES, size).train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, CLASSES, (batch,))
    rows, base = [], None
    for kernel, kwargs in KERNELS.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **kwargs)

        def train_step(opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        train_step()  # gradients and optimizer state exist from here on
        step_ms, train_ms = median_ms(opt.step, repeats), median_ms(train_step, max(repeats // 4, 3))
        base = base or (step_ms, train_ms)
        rows.append(f"| {name} | {kernel} | {step_ms:.1f} | {base[0] / step_ms:.1f}x | {train_ms:.0f} | "
                    f"{step_ms / train_ms:.0%} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows = [row for name in ("resnet18", "improved_cnn") for row in measure(name, args.size, args.batch_size,
                                                                             args.repeats)]
    body = f"""## Optimizer step: torch's default kernel vs the fused one

`python benchmarks/optimizer_step.py --size {args.size} --batch-size {args.batch_size} --repeats {args.repeats}`: AdamW
(the recipe's optimizer), {CLASSES} classes, fp32, on the CPU; {machine()}. Median milliseconds per optimizer step, and
per whole training step (forward + backward + step, batch {args.batch_size} at {args.size} px) with that kernel.

| model | kernel | step ms | speed-up | training step ms | step's share |
|---|---|---|---|---|---|
""" + "\n".join(rows) + """

`fit` builds its Adam / AdamW / SGD with `fused=True` wherever the parameters are floating point on the CPU or CUDA
(`carsml.engine.optim.fused`): the same update rule, one pass over the tensors. The plain loop of the real-dev
benchmark (`benchmarks/plain_loop.py`) keeps torch's default, what a user's own loop gets. The whole training
step varies by several percent from one measurement to the next, more than resnet18's step saves, so only the
step's own time and share are the finding: the saving matters for wide fully connected heads (improved_cnn).
"""
    print("wrote", write_section("optimizer_step", body))


if __name__ == "__main__":
    main()
