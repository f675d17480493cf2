"""A Ray Tune search: `spaces` (the YAML schema, validated), `space_values` (checks of single values in a
space file), `space_files` (spaces by name), `searchers` (Tune's param space and search algorithm from a
Space), `schedulers` (Tune's schedulers from a Space, a cohort's halving rungs), `trainable` (one trial),
`cohort_trainable` (one cohort trial: K configurations as one fused model) with `cohort_pbt` (PBT between its
members), `stopping`, `finalists` (the best trials scored again), `study_storage` (where a study lives),
`cluster` (Ray start-up, trial resources), `console`, `tuner` (build, fit, restore), `summary` (what a
finished search prints).

May import: training, quality, tracking.
"""
