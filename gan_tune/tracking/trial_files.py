"""Finding a trial's files (sample grids, GIF, history) where Ray keeps them, and uploading them to its run.

Trial files are read where Ray keeps them: the run's storage path on its pyarrow filesystem (local, NFS, or
s3:// / gs:// through pyarrow), plus the driver-local trial folders when the trial ran on the driver's node.
Ray uploads a worker's trial folder to the storage path only with `tune.SyncConfig(sync_artifacts=True)`, at
each checkpointed report and once more when the trial actor stops, which is after `on_trial_complete`;
`TrackingCallback.on_experiment_end` therefore uploads what arrived late.
"""

from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from mlflow import MlflowClient

from gan_tune.training.cohort import MEMBERS_KEY

# The files a trial writes (training.artifacts) that its child run gets; checkpoints stay in Ray's storage.
TRIAL_FILES = ("samples/epoch_*.png", "final_grid.png", "progress.gif", "history.png", "history.csv")
TrialFiles = dict[str, tuple[pafs.FileSystem, pafs.FileInfo]]  # path in the trial folder -> where to read it


def trial_sources(trial: Any) -> list[tuple[pafs.FileSystem, str]]:
    """Where a trial's files may be: its storage-path folder, then driver-local working and staging folders."""
    local = pafs.LocalFileSystem()
    return [(trial.storage.storage_filesystem, trial.path),
            (local, trial.storage.trial_working_directory),
            (local, trial.local_path)]


def trial_files(trial: Any) -> TrialFiles:
    return find_trial_files(trial_sources(trial))


def member_folder(trial_folder: str, member: str) -> str:
    """Where a cohort trial's member keeps its files: an ordinary trial folder's layout, inside the trial's."""
    return f"{trial_folder.rstrip('/')}/{MEMBERS_KEY}/{member}"


def member_files(trial: Any, member: str) -> TrialFiles:
    """A cohort member's files, at paths relative to its own folder (samples/epoch_003.png), as its run keeps them."""
    return find_trial_files([(fs, member_folder(root, member)) for fs, root in trial_sources(trial)])


def find_trial_files(sources: list[tuple[pafs.FileSystem, str]]) -> TrialFiles:
    """{path relative to the trial folder: (filesystem, info)} for TRIAL_FILES, newest copy of each."""
    found: TrialFiles = {}
    for fs, root in sources:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        for info in infos:
            rel = info.path[len(root.rstrip("/")) + 1:] if info.path.startswith(root.rstrip("/")) else info.base_name
            if info.type != pafs.FileType.File or not any(fnmatch.fnmatch(rel, p) for p in TRIAL_FILES):
                continue
            if rel not in found or newer(info, found[rel][1]):
                found[rel] = (fs, info)
    return found


def newer(a: pafs.FileInfo, b: pafs.FileInfo) -> bool:
    a_time, b_time = a.mtime_ns or 0, b.mtime_ns or 0
    return a_time > b_time or (a_time == b_time and (a.size or 0) > (b.size or 0))


def upload_files(client: MlflowClient, run_id: str, files: TrialFiles) -> None:
    """Log `files` (find_trial_files) as the run's artifacts, at their paths relative to the trial folder."""
    with tempfile.TemporaryDirectory(prefix="gan_tune_mlflow_") as staging:
        for rel, (fs, info) in files.items():
            target = Path(staging, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src:  # s3:// etc. download through pyarrow
                target.write_bytes(src.read())
        client.log_artifacts(run_id, staging)


def upload_folder(client: MlflowClient, run_id: str, folder: str) -> None:
    """A replayed upload_files entry: the trial files in a trial folder this machine can read."""
    if not Path(folder).is_dir():  # remote storage (s3://) is not read here: copy the folder over first
        raise FileNotFoundError(f"no trial folder {folder} on this machine")
    upload_files(client, run_id, find_trial_files([(pafs.LocalFileSystem(), folder)]))
