"""`python -m gan_tune.tracking replay FILE`: deliver the MLflow writes a search saved while its store was away.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gan_tune.cli import CliParser

# Studies started before the tracking split saved their callback in tuner.pkl as
# gan_tune.tracking.TrackingCallback; `search --resume` of such a study unpickles it from here (and then
# replaces it with this session's own, tuning.tuner.restore_tuner)
from gan_tune.tracking.child_runs import TrackingCallback  # noqa: E402,F401
from gan_tune.tracking.store import check_tracking, resolve_tracking_uri
from gan_tune.tracking.write_queue import UNDELIVERED, read_undelivered, replay
from gan_tune.training.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="python -m gan_tune.tracking",
                       description="Deliver MLflow writes a search saved while its store was away")
    parser.add_argument("command", choices=["replay"])
    parser.add_argument("file", type=Path, help=f"a study folder's {UNDELIVERED}, or the study folder")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///mlflow.db in the working directory)")
    args = parser.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        if args.file.is_dir():  # the study folder the search printed: its saved writes are in UNDELIVERED
            if not (args.file / UNDELIVERED).is_file():
                raise ConfigError("file", f"{args.file}: a folder without {UNDELIVERED} (nothing to replay)")
            args.file = args.file / UNDELIVERED
        if not args.file.is_file():
            raise ConfigError("file", f"{args.file}: no such file")
        read_undelivered(args.file)  # a damaged file fails before the store is touched
        check_tracking(uri)
        return replay(args.file, uri)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
