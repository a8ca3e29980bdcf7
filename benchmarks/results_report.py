"""Write the `report` section of docs/results.md: `carsml report`'s tables, generated from a tracking store alone.

    python benchmarks/results_report.py --tracking-uri sqlite:///mlflow.db --experiment stanford-cars [--path FILE]

Reads the runs of the experiment (and the registry's champions) through `carsml.experiments.report.build_report` and
replaces the text between `<!-- report:start -->` and `<!-- report:end -->` of docs/results.md (or `--path`) with the
report's Markdown; the rest of the file is left as it is. Missing steps are listed with the command that produces them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def main(argv: list[str] | None = None) -> Path:
    """Build the report of `--experiment` from `--tracking-uri` and write it into the marked section of `--path`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                        help="tracking store to read (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default="stanford-cars", help="MLflow experiment to report")
    parser.add_argument("--path", type=Path, default=RESULTS_MD, help="Markdown file holding the report markers")
    args = parser.parse_args(argv)
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri

    from carsml.experiments.report import build_report, to_markdown
    from carsml.tracking.runs import quiet_mlflow, setup_tracking

    quiet_mlflow()
    setup_tracking()
    body = to_markdown(build_report(args.experiment), heading_level=3)
    return write_section("report", body, path=args.path, header="# Results\n")


if __name__ == "__main__":
    print("wrote", main())
