"""Measurements behind the README's numbers: `throughput` (images/s, FID time, packing, parity),
`strategies` (which search strategy finds a good generator fastest), `quality_table` (what each setting
buys at equal wall time), `gpu_check` (the GPU checks in one call, `bench gpu-check`: CUDA tests, quick
bench, a tracked search, samples).

May import: training, quality, tracking, tuning.
"""
