"""`python -m gan_tune.report`: an HTML report of a search from its MLflow runs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gan_tune.cli import CliParser, name_arg, out_folder
from gan_tune.tracking.html_report import write_report
from gan_tune.tracking.store import DEFAULT_EXPERIMENT, resolve_tracking_uri
from gan_tune.training.config import ConfigError


def report_folder(text: str) -> str:
    """--out is the folder the report goes in (OUT/<run name>.html): a new one named .html is a file name mistaken
    for it."""
    if Path(text).suffix.lower() == ".html" and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a folder, not the report's file name (it is written as "
                                         "OUT/<parent run name>.html)")
    return out_folder(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.report", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--experiment", type=name_arg,
                       help=f"report the latest search of this experiment (default {DEFAULT_EXPERIMENT})")
    which.add_argument("--parent-run", help="report this search's parent run id")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--out", default=".", type=report_folder, help="folder for the HTML file (default: .)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one image: a bar is noise
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        path = write_report(uri, args.experiment, args.parent_run, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
