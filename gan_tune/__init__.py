"""gan_tune: find good GAN hyperparameters with Ray Tune, scored by a real quality metric, tracked in MLflow."""

__version__ = "0.1.0"
