"""Write one benchmark's section of docs/performance.md (each script owns the text between its markers)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

PERFORMANCE_MD = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
HEADER = (
    "# Performance\n\n"
    "Measured by the scripts in `benchmarks/` (medians of several runs; ratios, not absolute speeds).\n"
)


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} torch threads, {device}, torch {torch.__version__}"


def write_section(name: str, body: str, path: Path = PERFORMANCE_MD, header: str = HEADER) -> Path:
    """Replace (or append) the section `name` of `path` (docs/performance.md unless given); `header` starts a new
    file."""
    text = path.read_text() if path.exists() else header
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
