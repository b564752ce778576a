"""Fine-tuning on cached outputs of the frozen prefix (``freeze.cache_prefix=True``).

With the first blocks frozen, their forward pass computes the same features for an example in
every epoch: frozen BatchNorm normalises with running statistics, and the input pipeline does
not augment. ``build`` computes the frozen prefix's output once for every training example;
the train step then starts from it (``freeze.frozen_behaviour(plan, prefix_output=...)``), so
a step costs what the trainable blocks cost, never the whole network. The test split is still
evaluated through the whole network.

Before anything is cached, ``build`` checks on two training examples that the cached path gives
the train step's own outputs: a model whose later blocks read an earlier frozen block
(not only the prefix's last), or whose frozen blocks are random in training (dropout), is
refused with an error that says so.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from research import data, freeze, preprocess
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
    """A cache, without features yet, for ``exp``'s model input (an image's shape after
    preprocessing) and computation dtype."""
    from research import train  # train imports this module

    dtype = train.DTYPES[exp.cfg.train.dtype]
    image = jax.ShapeDtypeStruct((1, *exp.train_split.image_shape), jnp.uint8)
    model_input = jax.eval_shape(lambda x: preprocess.apply(x, exp.preprocess_spec, dtype), image)
    return PrefixCache(tuple(model_input.shape[1:]), dtype)


def build(exp, state, batch_size: int) -> PrefixCache:
    """The frozen prefix's output for every example of ``exp.train_split``, in order, after
    checking that training on it from ``state`` equals training through the whole network."""
    from research import train

    variables = state.variables()
    cache = empty(exp)
    prefix = jax.jit(prefix_function(exp.model, exp.plan, exp.preprocess_spec, cache.dtype))
    images, _ = exp.train_split.read_batch(np.arange(1))
    one = jax.eval_shape(prefix, variables, images)
    _check_memory(one, len(exp.train_split), exp.plan.frozen_prefix[-1])
    _check_same_step(exp, state, cache, prefix)
    features = np.empty((len(exp.train_split), *one.shape[1:]), one.dtype)
    done = 0
    for batch_images, _, mask in data.eval_batches(exp.train_split, batch_size):
        rows = data.process_rows((batch_images,), jax.process_index(), jax.process_count())
        out = prefix(variables, *train.global_batch(exp, *rows))
        out = np.asarray(multihost_utils.process_allgather(out, tiled=True))[mask]
        features[done:done + len(out)] = out
        done += len(out)
    cache.split = data.Split(_Features(features), np.arange(len(features)),
                             exp.train_split.labels, exp.train_split.num_classes)
    return cache


def _check_memory(one: jax.ShapeDtypeStruct, examples: int, last: str) -> None:
    need = examples * int(np.prod(one.shape[1:])) * np.dtype(one.dtype).itemsize
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have / 2:
        raise ConfigError(
            f"freeze.cache_prefix: the output of block {last!r} for {examples} training "
            f"examples takes {need / 2**30:.1f} GiB, over half of this host's "
            f"{have / 2**30:.1f} GiB. Freeze deeper (a smaller output), train on fewer "
            "examples, or set freeze.cache_prefix=False.")


def _check_same_step(exp, state, cache: PrefixCache, prefix) -> None:
    """One train step from the cached output and one through the whole network, from the same
    state on the same examples (a batch the mesh divides), must give the same loss."""
    from research import train

    rows = np.arange(max(2, exp.mesh.size)) % len(exp.train_split)
    local = data.process_rows(exp.train_split.read_batch(rows), jax.process_index(),
                              jax.process_count())
    images, labels = train.global_batch(exp, *local)
    copy = lambda: jax.tree.map(lambda a: a.copy(), state)
    _, expected = train.make_train_step(exp)(copy(), images, labels)
    _, got = train.make_train_step(exp, cache)(copy(), prefix(state.variables(), images),
                                                labels)
    expected, got = float(expected["loss"]), float(got["loss"])
    if not np.isclose(got, expected, rtol=1e-4, atol=1e-5):
        raise ConfigError(
            f"freeze.cache_prefix: a step on cached outputs of block "
            f"{exp.plan.frozen_prefix[-1]!r} gives loss {got:.6g}, the whole network "
            f"{expected:.6g}. {type(exp.model).__name__}'s later blocks read more than that "
            "block's output, or its frozen blocks are random in training (dropout): train "
            "without freeze.cache_prefix, or at another freeze.depth.")
