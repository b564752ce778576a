"""Every registered model keeps the registry's contract."""

import jax
import jax.numpy as jnp
import pytest

import models
from tests import reference


@pytest.mark.parametrize("name", models.list_models())
def test_blocks_are_the_top_level_parameters_in_forward_order(name):
    model = models.create(name, num_classes=7)
    size = models.model_info(name).input_size
    assert reference.creation_order(model, size) == tuple(model.blocks)


@pytest.mark.parametrize("name", models.list_models())
def test_logits_and_pre_logits_shapes(name):
    model = models.create(name, num_classes=7)
    size = models.model_info(name).input_size
    variables = models.variable_shapes(model, size)
    x = jax.ShapeDtypeStruct((2, size, size, model.in_chans), jnp.float32)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, pre_logits=True),
                              variables, x)
    assert logits.shape == (2, 7)
    assert features.ndim == 2 and features.shape[0] == 2
