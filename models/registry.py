"""A registry of architectures, as timm's ``create_model`` / ``list_models``.

Every registered model is a Flax Linen module with the fields ``num_classes``, ``in_chans``,
``dtype`` and ``dropout``, an ordered ``blocks`` tuple whose names are its top-level parameter
names, and the call ``model.apply(variables, images_nhwc, train=False, pre_logits=False)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    factory: Callable[..., nn.Module]
    input_size: int = 224  # the resolution the published weights were trained at
    min_size: int = 32  # the smallest square input the architecture admits
    torchvision: str | None = None  # torchvision's name for the same network


_REGISTRY: dict[str, ModelInfo] = {}


def register(name: str, factory: Callable[..., nn.Module], **info) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelInfo(name, factory, **info)


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} See models.list_models().") from None


def create(name: str, *, num_classes: int, in_chans: int = 3, dtype: Any = jnp.float32,
           **overrides) -> nn.Module:
    """Build the registered model ``name`` with a ``num_classes``-way head."""
    factory = model_info(name).factory
    try:
        return factory(num_classes=num_classes, in_chans=in_chans, dtype=dtype, **overrides)
    except TypeError as e:
        fields = sorted(f.name for f in dataclasses.fields(factory.func if hasattr(factory, "func") else factory)
                        if f.name not in ("parent", "name"))
        raise TypeError(f"model {name!r} does not take {sorted(overrides)}: {e}. "
                        f"Its options are {fields}.") from None


def input_shape(model: nn.Module, image_size: int, batch: int = 1) -> tuple[int, int, int, int]:
    return (batch, image_size, image_size, model.in_chans)


def init_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict:
    """Freshly initialised ``{"params": ..., "batch_stats": ...}`` for square inputs."""
    x = jnp.zeros(input_shape(model, image_size), jnp.float32)
    params_rng, dropout_rng = jax.random.split(rng)
    variables = jax.jit(lambda: model.init({"params": params_rng, "dropout": dropout_rng}, x,
                                           train=False))()
    return dict(variables)


def variable_shapes(model: nn.Module, image_size: int) -> dict:
    """The shapes and dtypes ``init_variables`` would produce, computed without allocating."""
    x = jax.ShapeDtypeStruct(input_shape(model, image_size), jnp.float32)
    return dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x))
