"""The `carsml` command line: one command per experiment (options generated from
carsml/experiments/defaults/<name>.yaml) plus
data, report and serving helpers. `mlflow run . -e <experiment>` calls these same commands (see MLproject)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from carsml.config import DEFAULTS_DIR, entry_points, load_config, options
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments import COMMANDS

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Dataset helpers: generate the synthetic dataset, analyse a dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)



def run_experiment(name: str, overrides: dict[str, Any] | None = None, *, passes_defaults: bool = False) -> Any:
    """Resolve the config of experiment `name` and run it (the Python API behind every command); see `load_config`
    for `passes_defaults`."""
    from carsml.engine import distributed  # torch, MLflow and the entry points load on use: --help stays quick
    from carsml.experiments.registry import ENTRY_POINTS

    cfg = load_config(name, overrides, passes_defaults=passes_defaults)
    here = distributed.world()
    if here.distributed and "nproc" not in cfg:
        raise ConfigError(f"{name} does not train over several processes (torchrun started {here.size}); DDP "
                          "trains baseline, improved and transfer runs, k-fold folds and tuning trials (`--nproc N`); "
                          "docs/scaling.md")
    if cfg.get("nproc", 1) > 1 and not here.distributed:
        return launch(name, cfg)
    if here.distributed:  # the processes torchrun started: what the run records (`torchrun` run by hand too)
        cfg = cfg.replace(nproc=here.size)
    return ENTRY_POINTS[name](cfg)


def launch(name: str, cfg: Mapping[str, Any]) -> None:
    """Run entry point `name` with `cfg` as `nproc` DDP processes: `torchrun --standalone --nproc-per-node N -m carsml
    <command> <every option>` on this machine (several machines: start torchrun yourself, docs/scaling.md). Rank 0
    prints the summary; a failed process fails the command."""
    import torch

    from carsml.engine import distributed
    from carsml.tracking.runs import param_text

    nproc, device = cfg["nproc"], str(cfg["device"])
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    available = torch.cuda.device_count() if on_cuda else len(os.sched_getaffinity(0))
    if nproc > available:
        what = "CUDA devices" if on_cuda else "CPU cores (gloo, one process per core at most)"
        raise ConfigError(f"nproc={nproc}: this machine has {available} {what}; pass --nproc {available} or fewer")
    distributed.check_config(cfg["batch_size"], cfg.get("freeze_backbone_epochs", 0), distributed.World(size=nproc))
    from carsml.experiments.registry import BEFORE_LAUNCH

    if name in BEFORE_LAUNCH:
        BEFORE_LAUNCH[name](dict(cfg))
    argv = [*COMMANDS[name].split()]
    for key in options(name):  # `--nproc` would be taken for torchrun's `--nproc-per-node`: WORLD_SIZE tells it
        if key != "nproc":
            argv += [f"--{key.replace('_', '-')}", param_text(cfg[key])]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "carsml", *argv]
    code = subprocess.run(command, check=False).returncode
    if code:
        raise CarsmlError(f"{name}: the {nproc} training processes failed (torchrun exit status {code}; the "
                          "first failure is printed above)")


def _print_summary() -> None:
    """The closing lines of every entry point: what ran, its key result, the model and where to look next."""
    from carsml.tracking.summary import last_run_summary

    lines = last_run_summary()
    if lines:
        print("\n".join(["", *lines]))


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


ALIASES = {"experiment_name": ("--experiment",)}  # shorter spellings the CLI also accepts (not in the MLproject)


def _register(name: str, command_name: str, target: typer.Typer) -> None:
    """Add a command whose options mirror the experiment's YAML defaults (so defaults live in one place)."""
    params = []
    for key, opt in options(name).items():
        # booleans take a value (`--use-boxes false`) so MLproject commands can pass them like any other parameter
        # an option that may be unset takes text: the empty string unsets it (as `mlflow run -P key=` does)
        kind = str if opt.kind.optional else {int: int, float: float}.get(opt.type, str)
        metavar = "|".join(opt.kind.choices) or {bool: "BOOL", int: "INT", float: "FLOAT"}.get(opt.type, "TEXT")
        shown = "empty" if opt.default is None else repr(opt.default)
        params.append(inspect.Parameter(
            key, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],  # noqa: UP045 - runtime-built annotation
            default=typer.Option(None, f"--{key.replace('_', '-')}", *ALIASES.get(key, ()), show_default=False,
                                 metavar=metavar, help=f"{opt.help} (default: {shown})"),
        ))

    params.append(inspect.Parameter(
        "verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--verbose", help="Show MLflow's own INFO lines and artifact progress bars."),
    ))

    def command(verbose: bool = False, **kwargs: Any) -> None:
        from carsml.engine import distributed
        from carsml.tracking.runs import quiet_mlflow

        quiet_mlflow(not verbose)
        try:
            # `mlflow run` (which sets MLFLOW_RUN_ID for the command) passes every MLproject parameter, defaults too
            run_experiment(name, kwargs, passes_defaults=bool(os.environ.get("MLFLOW_RUN_ID")))
        except CarsmlError as exc:
            _fail(exc)
        finally:
            distributed.finish()
        if distributed.world().main:  # under torchrun, rank 0's (a launching command ran no run of its own)
            _print_summary()

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    first_line = (DEFAULTS_DIR / f"{name}.yaml").read_text().splitlines()[0]
    command.__doc__ = first_line.lstrip("# ") + f"\n\nDefaults: carsml/experiments/defaults/{name}.yaml."
    target.command(command_name)(command)


for _name, _command in COMMANDS.items():
    if _name in entry_points():  # an entry point exists once its defaults file does
        _register(_name, _command.split()[-1], data_app if _command.startswith("data ") else app)


@app.command("compare")
def compare(
    experiment_name: str = typer.Option("stanford-cars", help="MLflow experiment holding the transfer runs."),
    parent_run_id: str = typer.Option("", help="Only the children of this transfer_all run (the table is also "
                                               "logged to it); default: the best run per model by val accuracy."),
    output: Path = typer.Option(Path("."), help="Folder for transfer_comparison.md and transfer_comparison.csv."),
) -> None:
    """Study row 10's table (model, params, val/test loss and accuracy, correct, errors, train time) from MLflow."""
    from carsml.experiments.compare import STEM, compare_runs, to_markdown

    try:
        table = compare_runs(experiment_name, parent_run_id, output)
    except CarsmlError as exc:
        _fail(exc)
    print(to_markdown(table), end="")
    console.print(f"wrote {output / (STEM + '.md')} and {output / (STEM + '.csv')}"
                  + (f"; logged to run {parent_run_id}" if parent_run_id else ""))


@data_app.command("synth")
def synth(
    out: Path = typer.Option(Path("synthetic_cars"), help="Folder to write the dataset into."),
    classes: int = typer.Option(20, help="Number of classes."),
    images_per_class: int = typer.Option(60, help="Images per class (train and test together)."),
    seed: int = typer.Option(0, help="Generator seed (same seed, same files)."),
    extra_class_images: int = typer.Option(100, help="Images in the extra BIG_TRUCKS folder."),
) -> None:
    """Write the synthetic dataset in the Stanford Cars devkit layout (loads with torchvision's StanfordCars)."""
    from carsml.data.synthetic import generate_synthetic

    try:
        root = generate_synthetic(out, num_classes=classes, images_per_class=images_per_class, seed=seed,
                                  extra_class_images=extra_class_images)
    except CarsmlError as exc:
        _fail(exc)
    console.print(f"wrote {root}  (torchvision.datasets.StanfordCars(root={str(out)!r}) loads it)")


@data_app.command("subset")
def subset(
    data: Path = typer.Option(..., help="A Stanford Cars download (devkit or Kaggle layout) with its images."),
    out: Path = typer.Option(..., help="New folder to write: index.csv and car_data/{train,test}/<class>/."),
    class_ids: str = typer.Option("", help="Comma-separated 1-based devkit class ids to keep (empty: every class "
                                            "of the index)."),
    index: Path = typer.Option(None, help="CSV of split,class_name,class_id_1based,fname (default: the real dev "
                                          "set's, shipped with carsml)."),
    max_side: int = typer.Option(320, help="Downsize each crop so its longer side is at most this many pixels."),
) -> None:
    """Rebuild the real dev set (60 classes, 1,751 train / 755 test box crops) that carsml's docs measure on, or
    some of its classes, from a Stanford Cars download."""
    from carsml.data.readers import load_dataset
    from carsml.data.subset import DEV_INDEX, build_subset, read_index

    try:
        ids = [int(c) for c in class_ids.split(",") if c.strip()]
    except ValueError:
        _fail(ConfigError(f"class_ids: expected comma-separated integers, got {class_ids!r}"))
    try:
        rows = read_index(index or DEV_INDEX, ids)
        folder = build_subset(load_dataset(data), rows, out, max_side)
    except CarsmlError as exc:
        _fail(exc)
    counts = rows["split"].value_counts()
    console.print(f"wrote {folder}: {rows['class_name'].nunique()} classes, {counts.get('train', 0)} train / "
                  f"{counts.get('test', 0)} test images  (carsml improved --data {folder})")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="carsml")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
