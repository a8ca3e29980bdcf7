"""`pip install .` (not editable) gives a working carsml: the defaults and recipes ship inside the package, so every
entry point's options load and the CLI lists every command from an installed copy, away from this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from carsml.config import entry_points, recipes
from tests.conftest import REPO

pytestmark = pytest.mark.slow

CHECK = """
import json, sys
import carsml, carsml.config as c
from carsml.experiments import COMMANDS
assert "site" in carsml.__file__ or sys.argv[1] in carsml.__file__, carsml.__file__
print(json.dumps({"file": carsml.__file__, "entry_points": c.entry_points(), "recipes": c.recipes(),
                  "options": {n: len(c.options(n)) for n in c.entry_points()}, "commands": sorted(COMMANDS)}))
"""


def test_a_non_editable_install_ships_the_defaults(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:  # a copy of the checkout, so the build writes nothing into it
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    assert not (target / "carsml" / "__init__.py").is_symlink()
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    found = json.loads(out.stdout)
    assert found["file"].startswith(str(target))  # the installed copy, not this checkout
    assert found["entry_points"] == entry_points()
    assert found["recipes"] == recipes()
    assert all(n > 0 for n in found["options"].values())
    assert set(found["entry_points"]) == set(found["commands"])
    help_text = subprocess.run([sys.executable, "-c", "from carsml.cli import app; app()", "--help"], cwd=elsewhere,
                               env=env, capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0, help_text.stderr[-3000:]
    for command in ("baseline", "improved", "transfer-all", "features-rf", "tune", "promote"):
        assert command in help_text.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine the check runs for real")
def test_the_gpu_check_skips_cleanly_without_cuda() -> None:
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VIRTUAL_ENV": sys.prefix, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device on this machine; skipped" in done.stdout
