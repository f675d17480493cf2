"""Studies saved before the sub-package layout still resume: their tuner.pkl names today's modules by old paths.

tests/data/study_before_layout/ is the Tune state of a real smoke study written by the flat layout
(`python -m gan_tune.search --space smoke --num-samples 2 --max-epochs 1`, commit 44704d7); its tuner.pkl
pickles the stopper, the console callback and the tracking callback as gan_tune.stopping.GanStopper,
gan_tune.console.TrialLines and gan_tune.trial_runs.TrackingCallback. The trial folders are left out (4 MB
of checkpoints): Tune's restore unpickles tuner.pkl and reads the experiment state, which is what moved.
"""

import pickle
import re
import shutil
from pathlib import Path

from ray import tune

from gan_tune.tracking.child_runs import TrackingCallback
from gan_tune.tuning import trainable, tuner

STUDY = Path(__file__).parent / "data" / "study_before_layout"


def test_a_study_saved_before_the_layout_change_restores(ray_local, tmp_path):
    study = tmp_path / "before_layout"
    shutil.copytree(STUDY, study)
    stopper, marker = tune.stopper.MaximumIterationStopper(1), tune.Callback()
    restored = tuner.restore_tuner(str(study), trainable.train_gan, restart_errored=False, stop=stopper,
                                   callbacks=[marker])
    assert restored._local_tuner.get_run_config().callbacks == [marker]


def test_the_old_module_paths_unpickle_to_todays_classes():
    tuner.alias_moved_modules()
    names = {b"gan_tune.console", b"gan_tune.stopping", b"gan_tune.trial_runs"}
    assert names <= set(re.findall(rb"gan_tune[\w.]*", (STUDY / "tuner.pkl").read_bytes()))
    # a callback pickled by the layout before the tracking split (gan_tune.tracking.TrackingCallback)
    assert pickle.loads(pickle.dumps(TrackingCallback, protocol=0).replace(b"gan_tune.tracking.child_runs", b"gan_tune.tracking")) \
        is TrackingCallback
    assert pickle.loads(pickle.dumps(TrackingCallback, protocol=0).replace(b"gan_tune.tracking.child_runs", b"gan_tune.trial_runs")) \
        is TrackingCallback
