"""Studies saved before the sub-package layout still resume: their tuner.pkl names today's modules by old paths.

tests/data/study_before_layout/ is a real smoke study written by the flat layout (commit 44704d7, the one before
the move) and killed mid-trial: `python -m gan_tune.search --space smoke --num-samples 1 --max-epochs 2` with the
fault gate holding trial _00000 after epoch 1, SIGKILLed once Tune's saved state named the epoch-1 checkpoint.
Its tuner.pkl pickles the stopper, the console callback and the tracking callback as gan_tune.stopping.GanStopper,
gan_tune.console.TrialLines and gan_tune.trial_runs.TrackingCallback; its checkpoint was written by the old
checkpoint code. (2 MB, most of it the checkpoint.)
"""

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from gan_tune.tracking.child_runs import TrackingCallback
from gan_tune.tuning import tuner

ROOT = Path(__file__).parents[1]
STUDY = Path(__file__).parent / "data" / "study_before_layout"


def test_a_study_killed_before_the_layout_change_resumes_to_its_end(tmp_path):
    """`--resume` with today's code: the old tuner.pkl restores, the trial restores its epoch-1 checkpoint and
    trains epoch 2. (A fresh tracking store: the study's own was in a temp folder on the machine that wrote it.)"""
    study = tmp_path / "before_layout"
    shutil.copytree(STUDY, study)
    resumed = subprocess.run([sys.executable, "-m", "gan_tune.search", "--resume", str(study),
                              "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], cwd=ROOT, capture_output=True,
                             text=True, timeout=400, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "1 trials, 0 errored" in resumed.stdout, resumed.stdout[-3000:]
    # history.csv, not Tune's progress.csv: Tune's CSV logger appends the resumed results under the old header,
    # and today's results carry keys the old ones did not (augment_p, score_s, ...)
    (history,) = [pd.read_csv(path) for path in study.glob("train_gan_*/history.csv")]
    assert history["epoch"].tolist() == [1, 2]
    assert history["restored_epoch"].tolist() == [0, 1]  # epoch 2 trained on from the old checkpoint


def test_the_old_module_paths_unpickle_to_todays_classes():
    tuner.alias_moved_modules()
    names = {b"gan_tune.console", b"gan_tune.stopping", b"gan_tune.trial_runs"}
    assert names <= set(re.findall(rb"gan_tune[\w.]*", (STUDY / "tuner.pkl").read_bytes()))
    # a callback pickled by the layout before the tracking split (gan_tune.tracking.TrackingCallback)
    assert pickle.loads(pickle.dumps(TrackingCallback, protocol=0).replace(b"gan_tune.tracking.child_runs", b"gan_tune.tracking")) \
        is TrackingCallback
    assert pickle.loads(pickle.dumps(TrackingCallback, protocol=0).replace(b"gan_tune.tracking.child_runs", b"gan_tune.trial_runs")) \
        is TrackingCallback
