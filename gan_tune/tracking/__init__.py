"""MLflow tracking of a search: `store` (the tracking URI and its checks), `parent_run` (the search's run and
its best trial), `child_runs` (`TrackingCallback`: one child run per Tune trial), `member_runs` (a cohort trial's
members, one child run each), `trial_files` (a trial's or member's files on the storage filesystem),
`write_queue` (writes an unreachable store refused: queued, saved, replayed), `logged_model` (the generator
logged on a parent run, read back: `python -m gan_tune.sample`), `html_report` (a search's runs drawn as an
HTML page); `python -m gan_tune.tracking replay` is `__main__`.

Every MLflow write happens in the Ray driver: a sqlite store takes one writer at a time, so trials never
talk to MLflow. May import: training, quality.
"""


def __getattr__(name: str):
    # Studies saved before the tracking split pickled their callback as gan_tune.tracking.TrackingCallback.
    if name == "TrackingCallback":
        from gan_tune.tracking.child_runs import TrackingCallback

        return TrackingCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
