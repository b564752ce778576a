"""Fine-tuning on cached outputs of the frozen prefix (``freeze.cache_prefix=True``).

With the first blocks frozen, their forward pass computes the same features for an example in
every epoch: frozen BatchNorm normalises with running statistics, and the input pipeline does
not augment. ``fill`` computes the frozen prefix's output once for every training example; the
train step then starts from it (``freeze.frozen_behaviour(plan, prefix_output=...)``), so a step
costs what the trainable blocks cost, never the whole network. The test split is still
evaluated through the whole network.

A linear probe is the deepest case: every block but the head frozen
(``freeze.depth = len(model.blocks) - 1``), the head trained by the run's optimizer on features
computed once. It is the project's one linear probe: the quickstart's ``linear_probe`` regime,
the logistic regression of ``configs/kornblith.py`` (its L2 strength chosen by a sweep's
``choose``) and ``scripts.bench``'s "linear probe: cached vs recompute" are such runs.

Before anything is cached, ``research.train`` checks on a few training examples that a step on
the cached path equals a step through the whole network: a model whose later blocks read an
earlier frozen block (not only the prefix's last), or whose frozen blocks are random in
training (dropout), is refused with an error that says so.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from research import data, freeze, preprocess, sharding
from research.errors import ConfigError


class _PrefixComputed(Exception):
    def __init__(self, output):
        super().__init__("the frozen prefix's output")
        self.output = output


class _Features:
    """A data source whose records are rows of a features array."""

    def __init__(self, features: np.ndarray):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.features[index]}

    def __getitems__(self, indices) -> list[dict]:
        return [{"image": self.features[i]} for i in indices]


@dataclasses.dataclass
class PrefixCache:
    input_shape: tuple[int, ...]  # one model input (after preprocessing)
    dtype: jnp.dtype
    prefix: Callable  # jit-compiled (variables, images) → the frozen prefix's output
    split: data.Split | None = None  # the training split, its "images" the prefix's outputs

    def model_input(self, batch: int):
        """The model's input in a cached step: zeros nothing reads (XLA drops the prefix)."""
        return jnp.zeros((batch, *self.input_shape), self.dtype)


def prefix_function(model, plan: freeze.FreezePlan, spec: dict, dtype):
    """``(variables, images) → output of the frozen prefix's last block``, in inference mode."""
    if not plan.frozen_prefix:
        raise ConfigError("freeze.cache_prefix needs frozen leading blocks: set freeze.depth "
                          "(≥ 1) or turn freeze.cache_prefix off.")
    last = plan.frozen_prefix[-1]

    def stop_after_prefix(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and "/".join(context.module.path) == last:
            raise _PrefixComputed(out)
        return out

    def prefix(variables, images):
        try:
            with nn.intercept_methods(stop_after_prefix):
                model.apply(variables, preprocess.apply(images, spec, dtype), train=False)
        except _PrefixComputed as done:
            return done.output
        raise ConfigError(f"block {last!r} of {type(model).__name__} is never called: "
                          "cache_prefix cannot find the frozen prefix's output.")
    return prefix


def empty(exp) -> PrefixCache:
    """A cache, without features yet, for ``exp``'s frozen prefix, model input (an image's
    shape after preprocessing) and computation dtype."""
    image = jax.ShapeDtypeStruct((1, *exp.train_split.image_shape), jnp.uint8)
    model_input = jax.eval_shape(lambda x: preprocess.apply(x, exp.preprocess_spec, exp.dtype),
                                 image)
    prefix = prefix_function(exp.model, exp.plan, exp.preprocess_spec, exp.dtype)
    return PrefixCache(tuple(model_input.shape[1:]), exp.dtype, jax.jit(prefix))


def fill(cache: PrefixCache, exp, variables, batch_size: int) -> PrefixCache:
    """``cache`` with the frozen prefix's output for every example of ``exp.train_split``, in
    order, computed from ``variables`` over ``exp.mesh`` in batches of ``batch_size``."""
    images, _ = exp.train_split.read_batch(np.arange(1))
    one = jax.eval_shape(cache.prefix, variables, images)
    _check_memory(one, len(exp.train_split), exp.plan.frozen_prefix[-1])
    features = np.empty((len(exp.train_split), *one.shape[1:]), one.dtype)
    done = 0
    for batch_images, _, mask in data.eval_batches(exp.train_split, batch_size):
        local = data.process_rows((batch_images,), jax.process_index(), jax.process_count())
        out = cache.prefix(variables, *sharding.global_batch(exp.mesh, *local))
        out = np.asarray(multihost_utils.process_allgather(out, tiled=True))[mask]
        features[done:done + len(out)] = out
        done += len(out)
    split = data.Split(_Features(features), np.arange(len(features)), exp.train_split.labels,
                       exp.train_split.num_classes)
    return dataclasses.replace(cache, split=split)


def _check_memory(one: jax.ShapeDtypeStruct, examples: int, last: str) -> None:
    need = examples * int(np.prod(one.shape[1:])) * np.dtype(one.dtype).itemsize
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have / 2:
        raise ConfigError(
            f"freeze.cache_prefix: the output of block {last!r} for {examples} training "
            f"examples takes {need / 2**30:.1f} GiB, over half of this host's "
            f"{have / 2**30:.1f} GiB. Freeze deeper (a smaller output), train on fewer "
            "examples, or set freeze.cache_prefix=False.")
