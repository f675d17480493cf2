"""The shipped search spaces (*.yaml), importable so `--space NAME` resolves from an installed wheel too."""
