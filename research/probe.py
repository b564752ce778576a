"""Linear probes on cached features: run the frozen backbone once, then train only the head.

For a linear probe (every block frozen but the head) recomputing the backbone every step is
wasted work; ``extract_features`` computes the pre-logit features of a split once, and
``train_head`` fits a new ``head`` on them with the run's optimizer settings.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import data, preprocess


def extract_features(model, variables, spec: dict, split: data.Split, batch_size: int = 256):
    """``(features, labels)`` of every example of ``split``, in order."""
    forward = jax.jit(lambda v, x: model.apply(v, preprocess.apply(x, spec), train=False,
                                               pre_logits=True))
    features, labels = [], []
    for images, batch_labels, mask in data.eval_batches(split, batch_size):
        features.append(np.asarray(forward(variables, images))[mask])
        labels.append(batch_labels[mask])
    return np.concatenate(features), np.concatenate(labels)


# One optimizer for every probe, its learning rate fed each step: the step compiles once per
# shape, not once per call.
_SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9)


def _head_loss(params, x, y):
    logits = x @ params["kernel"] + params["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def _head_step(params, opt_state, x, y, lr):
    opt_state.hyperparams["learning_rate"] = lr
    updates, opt_state = _SGD.update(jax.grad(_head_loss)(params, x, y), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _head_start(key, example, lr, *, num_classes: int, steps: int):
    """A new head, its optimizer state and every step's learning rate, in one compiled call:
    built eagerly, op by op, they took 24 ms of a short probe's 60 (a 2048 → 1000 head, ten
    steps at batch 16: 48 ms an epoch with this)."""
    params = nn.Dense(num_classes).init(key, example)["params"]
    rates = optax.cosine_decay_schedule(lr, steps)(jnp.arange(steps))
    return params, _SGD.init(params), rates


def train_head(features: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int,
               batch_size: int, lr: float, seed: int = 0):
    """Head parameters (``kernel``, ``bias``) fitted by SGD with momentum 0.9 and a cosine
    learning-rate decay on cached features."""
    steps_per_epoch = len(features) // batch_size
    params, opt_state, rates = _head_start(jax.random.key(seed), features[:1], lr,
                                           num_classes=num_classes,
                                           steps=epochs * steps_per_epoch)
    rates = np.asarray(rates)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(len(features))
        for k in range(steps_per_epoch):
            rows = order[k * batch_size:(k + 1) * batch_size]
            params, opt_state = _head_step(params, opt_state, jnp.asarray(features[rows]),
                                           jnp.asarray(labels[rows]),
                                           rates[epoch * steps_per_epoch + k])
    return params


def accuracy(head_params, features: np.ndarray, labels: np.ndarray) -> float:
    logits = features @ np.asarray(head_params["kernel"]) + np.asarray(head_params["bias"])
    return float(np.mean(np.argmax(logits, -1) == labels))
