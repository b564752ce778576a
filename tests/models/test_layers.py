"""``models.layers``: each layer has its Flax counterpart's variables and computes its values
and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers


def random(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def assert_same_layer(ours, theirs, variables, x, atol=1e-5):
    """``ours`` and ``theirs`` applied with ``variables``: the same outputs, and the same
    gradients of a loss with respect to the variables and the input."""
    def values_and_grads(apply):
        loss = lambda v, x: jnp.sum(jnp.sin(apply(v, x)))
        return apply(variables, x), jax.grad(loss, argnums=(0, 1))(variables, x)

    for got, expected in zip(*map(jax.tree.leaves, (values_and_grads(ours),
                                                    values_and_grads(theirs)))):
        np.testing.assert_allclose(got, expected, atol=atol)


def assert_same_variables(ours, theirs):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for got, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("act,flax_act", [
    (None, lambda y: y), (nn.relu, nn.relu),
    (layers.gelu, lambda y: jax.nn.gelu(y, approximate=False))])
def test_dense_is_flax_dense_then_the_activation(act, flax_act):
    x = random(2, 5, 12)
    ours, theirs = layers.Dense(7, act=act), nn.Dense(7)
    variables = theirs.init(jax.random.key(0), x)
    assert_same_variables(ours.init(jax.random.key(0), x), variables)
    variables = jax.tree.map(lambda v: v + random(*v.shape, seed=1), variables)  # bias ≠ 0
    assert_same_layer(ours.apply, lambda v, x: flax_act(theirs.apply(v, x)), variables, x)


def test_classifier_head_holds_its_dense_variables_and_drops_out_in_training_only():
    x = random(4, 16)
    head = layers.ClassifierHead(3, dropout=0.5)
    variables = head.init(jax.random.key(0), x)
    assert_same_variables(variables, nn.Dense(3).init(jax.random.key(0), x))
    np.testing.assert_allclose(head.apply(variables, x), nn.Dense(3).apply(variables, x),
                               atol=1e-6)
    train = head.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train, head.apply(variables, x), atol=1e-3)


def test_multi_head_self_attention_is_flax_multi_head_dot_product_attention():
    x = random(2, 7, 24)
    ours, theirs = layers.MultiHeadSelfAttention(3), nn.MultiHeadDotProductAttention(3)
    variables = theirs.init(jax.random.key(0), x)
    assert_same_variables(ours.init(jax.random.key(0), x), variables)
    variables = jax.tree.map(lambda v: v + 0.1 * random(*v.shape, seed=1), variables)
    assert_same_layer(ours.apply, theirs.apply, variables, x)
    first_token = ours.clone(class_token_only=True)
    assert_same_layer(first_token.apply, lambda v, x: theirs.apply(v, x)[:, :1], variables, x)


def test_multi_head_self_attention_drops_attention_weights_in_training_only():
    x = random(2, 7, 24)
    attention = layers.MultiHeadSelfAttention(3, dropout_rate=0.5)
    variables = attention.init(jax.random.key(0), x)
    train = lambda key: attention.apply(variables, x, train=True,
                                        rngs={"dropout": jax.random.key(key)})
    assert not np.allclose(train(1), train(2), atol=1e-3)
    np.testing.assert_allclose(attention.apply(variables, x),
                               attention.clone(dropout_rate=0.0).apply(variables, x, train=True),
                               atol=1e-6)


def test_max_pool_same_is_tensorflows():
    x = random(2, 7, 8, 3)
    np.testing.assert_array_equal(layers.max_pool(x, 3, 2, padding="same"),
                                  nn.max_pool(x, (3, 3), (2, 2), padding="SAME"))


@pytest.mark.parametrize("shape,window", [((2, 28, 28, 6), 2), ((2, 9, 12, 3), 3)])
def test_avg_pool_over_tiles_is_flaxs_with_its_gradient(shape, window):
    x = random(*shape)
    pool = lambda pool: lambda x: pool(x) ** 2  # a gradient that varies over each window
    ours = pool(lambda x: layers.avg_pool(x, window, window))
    theirs = pool(lambda x: nn.avg_pool(x, (window, window), (window, window)))
    np.testing.assert_allclose(ours(x), theirs(x), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: ours(x).sum())(x),
                               jax.grad(lambda x: theirs(x).sum())(x), atol=1e-6)
