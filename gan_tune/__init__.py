"""gan_tune: find good GAN hyperparameters with Ray Tune, scored by a real quality metric, tracked in MLflow.

The sub-packages, in the order data flows through them (each imports only those before it):

    training/    config -> data -> models, losses -> step -> loop; checkpoint, artifacts
    quality/     the MNIST classifier -> measures (FID, IS, coverage) -> scorer; baselines
    tracking/    MLflow: store -> parent_run, child_runs (trial_files, write_queue); html_report
    tuning/      spaces -> schedulers -> trainable -> stopping -> tuner -> finalists -> summary
    benchmarks/  throughput, strategies, quality_table

The modules at this level are the commands (`python -m gan_tune.NAME`): they parse arguments and call the
sub-packages. `cli` is the parser they share; `python -m gan_tune.tracking replay` is tracking/__main__.py.
"""

__version__ = "0.1.0"
