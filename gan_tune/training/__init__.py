"""One GAN run: `config` (TrainConfig, validated), `data` (MNIST on the device), `models` (the families and
D's normalisations), `losses`, `augment` (DiffAugment of what D sees, adaptive p), `step` (one capture-safe
D + G iteration, the CUDA graph), `loop` (an epoch with one host sync, the end-of-epoch schedule),
`checkpoint`, `artifacts` (grids, plots, GIF), `run_folder` (one training run written to its folder: the
driver behind `python -m gan_tune.train`); cohort trials (issue 27): `fused` (K models of one family as one),
`cohort` (grouping, per-member Adam, removing and copying members), `cohort_step` (one capture-safe iteration
of every member), `cohort_checkpoint` (the fused cohort's checkpoint and its best member's).

The bottom layer: imports no other gan_tune sub-package.
"""
