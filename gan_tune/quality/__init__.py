"""How good a generator is: `mnist_classifier` (the frozen feature network), `measures` (Fréchet distance,
IS, coverage: the metric registry), `scorer` (a generator's samples through the classifier, the real
statistics and their cache), `baselines` (reference sets that put the scores on a scale).

May import: training.
"""
