"""The GPU path proven, in one run on a machine with a CUDA GPU (benchmarks/gpu_check.sh; <= 8 minutes on one GPU):

1. the tests marked `gpu` (`pytest -m gpu`);
2. the input pipeline against compute on the GPU (`pipeline_vs_compute`: fit's training images/s over bare
   forward/backward/step on random tensors already on the device; goal >= 0.9), resnet18 at 128 px;
3. resnet50 at 224 px training images/s with AMP + channels_last, eager and under `torch.compile` (which the
   engine does not use: the row says whether it would help).

Prints one markdown table (and writes it to $OUT/gpu_check.md when OUT is set). Without CUDA it says so and exits 0.

    python benchmarks/gpu_check.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_vs_compute import compute_only, end_to_end  # noqa: E402
from report import machine  # noqa: E402

from carsml.experiments.train import engine_config  # noqa: E402
from carsml.models.factory import create_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def gpu_tests() -> tuple[str, str]:
    """(verdict, summary line) of `pytest -m gpu`."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "--timeout", "300"], cwd=REPO, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if " passed" in line or " failed" in line or "error" in line]
    summary = lines[-1] if lines else done.stdout[-300:]
    if done.returncode:
        print(done.stdout[-5000:], done.stderr[-2000:], sep="\n")
    return ("pass" if done.returncode == 0 else "FAIL"), f"{summary} ({time.perf_counter() - start:.0f} s)"


def pipeline_ratio(size: int, images: int, batch: int) -> tuple[float, float]:
    """(end-to-end, compute-only) training images/s of resnet18 with the carsml recipe's pipeline on the GPU."""
    cfg = engine_config(epochs=3, batch_size=batch, lr=1e-4, device="cuda")
    pure = compute_only(create_model("resnet18", 20, size), cfg, (batch, 3, size, size), 20, images // batch)
    e2e = end_to_end("resnet18", {}, cfg, size, images, 20, "crop", 1.5)
    return e2e, pure


def resnet50_speed(size: int, batch: int, steps: int, compiled: bool) -> float:
    """resnet50 training images/s (AMP bf16/fp16 + channels_last), eager or `torch.compile`d; median of 3 timings."""
    cfg = engine_config(batch_size=batch, lr=1e-4, device="cuda", channels_last=True)
    model = create_model("resnet50", 196, size)
    if compiled:
        model = torch.compile(model)
        compute_only(model, cfg, (batch, 3, size, size), 196, 3)  # compile and warm up outside the timing
    return statistics.median(compute_only(model, cfg, (batch, 3, size, size), 196, steps) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller timings (a smoke run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; skipped (the `gpu` tests skip here too)")
        return
    rows = [("machine", machine(), "")]
    verdict, summary = gpu_tests()
    rows.append(("tests marked gpu", summary, verdict))
    e2e, pure = pipeline_ratio(128, 1024 if args.quick else 4096, 128)
    rows.append(("pipeline vs compute, resnet18 @128, recipe pipeline",
                 f"{e2e:,.0f} / {pure:,.0f} images/s = **{e2e / pure:.2f}**", "goal >= 0.9"))
    steps = 5 if args.quick else 20
    eager = resnet50_speed(224, 64, steps, compiled=False)
    rows.append(("resnet50 @224 train, AMP + channels_last", f"{eager:,.0f} images/s", "eager (what fit runs)"))
    try:
        compiled = resnet50_speed(224, 64, steps, compiled=True)
        rows.append(("... under torch.compile", f"{compiled:,.0f} images/s = {compiled / eager:.2f}x eager",
                     "helps" if compiled > 1.05 * eager else "no gain"))
    except Exception as exc:  # noqa: BLE001 - a compiler that fails here is a finding, not a crash of the check
        rows.append(("... under torch.compile", f"failed: {type(exc).__name__}: {str(exc)[:200]}", "not used"))
    table = "| check | result | note |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(table + "\n")
    if verdict != "pass":
        sys.exit(1)


if __name__ == "__main__":
    main()
