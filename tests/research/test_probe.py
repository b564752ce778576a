import numpy as np

from research import probe


def clusters(n: int, classes: int, width: int, seed: int = 0):
    """Gaussian clusters around centres that depend on ``classes`` and ``width`` only."""
    centres = np.random.default_rng(classes * width).standard_normal((classes, width)) * 3
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    return (centres[labels] + rng.standard_normal((n, width))).astype(np.float32), labels


def test_head_fits_separable_features():
    features, labels = clusters(1000, 5, 32)
    head = probe.train_head(features, labels, 5, epochs=3, batch_size=50, lr=0.1)
    assert head["kernel"].shape == (32, 5) and head["bias"].shape == (5,)
    test_features, test_labels = clusters(500, 5, 32, seed=1)
    assert probe.accuracy(head, test_features, test_labels) > 0.95


def test_probes_of_one_shape_compile_once():
    """A probe's step compiles once per shape, whatever the learning rate or epochs."""
    features, labels = clusters(200, 4, 16)
    probe.train_head(features, labels, 4, epochs=1, batch_size=20, lr=0.1)
    compiled = probe._head_step._cache_size()
    probe.train_head(features, labels, 4, epochs=2, batch_size=20, lr=0.01, seed=1)
    assert probe._head_step._cache_size() == compiled
