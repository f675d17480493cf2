"""MLflow tracking of a search, and `python -m gan_tune.tracking replay FILE`.

A search has one parent run (search_run) and one child run per Tune trial (trial_runs). Every MLflow write
happens in the Ray driver process: a sqlite store takes one writer at a time, and several processes creating a
fresh store at once race on its schema migration, so trials never talk to MLflow. `tracking_store` resolves
and checks the store (and creates a sqlite one), `search_run` makes the experiment and the parent run,
`trial_runs.TrackingCallback` writes the child runs, `trial_files` finds the files a trial wrote, and
`write_queue` holds the writes a store that went away refuses, saves them at the end of a search and, through
this module's `replay` command, delivers them once the store is back.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gan_tune.config import CliParser, ConfigError
from gan_tune.tracking_store import check_tracking, resolve_tracking_uri
from gan_tune.write_queue import UNDELIVERED, read_undelivered, replay

# Studies started before the tracking split saved their callback in tuner.pkl as
# gan_tune.tracking.TrackingCallback; `search --resume` of such a study unpickles it from here (and then
# replaces it with this session's own, search.restore_tuner)
from gan_tune.trial_runs import TrackingCallback  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="python -m gan_tune.tracking",
                       description="Deliver MLflow writes a search saved while its store was away")
    parser.add_argument("command", choices=["replay"])
    parser.add_argument("file", type=Path, help=f"a study folder's {UNDELIVERED}")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///mlflow.db in the working directory)")
    args = parser.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
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
