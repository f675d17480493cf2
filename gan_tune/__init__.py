"""gan_tune: find good GAN hyperparameters with Ray Tune, scored by a real quality metric, tracked in MLflow.

Data flows config -> data -> train step -> trial -> scheduler -> tracking -> report, through
training.config, training.data, training.step / training.loop, tuning.trainable, tuning.schedulers /
tuning.tuner, tracking.child_runs / tracking.parent_run and tracking.html_report (README: Layout).

The sub-packages in import order (each imports only those before it):

    training/    config -> data -> models, losses, augment -> step -> loop -> run_folder; checkpoint, artifacts;
                 cohorts: fused -> cohort -> cohort_step, cohort_checkpoint
    quality/     the MNIST classifier -> measures (FID, IS, coverage) -> scorer; baselines
    tracking/    MLflow: store -> parent_run, child_runs, member_runs (trial_files, write_queue); logged_model;
                 html_report
    tuning/      spaces -> searchers, schedulers -> trainable, cohort_trainable -> stopping -> tuner -> finalists
                 -> summary
    benchmarks/  throughput, strategies, quality_table, gpu_check

The modules at this level are the commands (`python -m gan_tune.NAME`): they parse arguments and call the
sub-packages. `cli` is the parser they share; `python -m gan_tune.tracking replay` is tracking/__main__.py.
"""

__version__ = "0.1.0"
