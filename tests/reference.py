"""Helpers comparing transferlab models with reference implementations built with random weights."""

from __future__ import annotations

import numpy as np
import pytest

import models
from research import tree
from research.convert.torchvision import IMAGENET_MEAN, IMAGENET_STD


def torch_or_skip():
    """torch and torchvision, or a skip naming the reason (CI installs both, so never skips)."""
    torch = pytest.importorskip("torch", reason="the torchvision reference tests need torch")
    pytest.importorskip("torchvision", reason="the torchvision reference tests need torchvision")
    torch.set_num_threads(2)
    return torch


def randomise_batchnorm(torch_model, image_size: int = 64, seed: int = 0) -> None:
    """Random BN affine parameters, and running statistics measured on random images.

    Statistics measured on data (as in a trained network) keep activations near unit scale,
    so logits stay O(1) and a 1e-4 tolerance tests the conversion, not float32 rounding of
    exploding activations.
    """
    import torch
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in torch_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for module in norms:
            module.weight.copy_(torch.rand(module.num_features, generator=gen) * 0.5 + 0.5)
            module.bias.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
        torch_model.train()
        channels = _input_channels(torch_model)
        for _ in range(2):
            torch_model(torch.randn(8, channels, image_size, image_size, generator=gen))
        torch_model.eval()


def randomise_constants(torch_model, seed: int = 0) -> None:
    """torchvision and timm start a ViT's LayerNorms at identity, its biases and class token
    near zero and (torchvision) its head at zero: random values instead, so that every
    tensor's conversion shows in the logits."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in torch_model.named_parameters():
            if name.endswith("bias") or name in ("class_token", "cls_token"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif param.ndim == 1:
                param.copy_(torch.rand(param.shape, generator=gen) * 0.5 + 0.5)
            elif name.startswith("heads."):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def assert_checkpoint_matches(loaded, torch_model, normalise, size: int = 224) -> None:
    """``loaded.preprocess`` then ``loaded.model`` equal ``torch_model`` on the same raw images
    (RGB in [0, 255]) normalised by ``normalise``, the source's own preprocessing."""
    raw = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    expected = torch_logits(torch_model, normalise(raw).astype(np.float32))
    got = loaded.model.apply(loaded.variables, loaded.preprocess(raw), train=False)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def imagenet_normalise(raw: np.ndarray) -> np.ndarray:
    return (raw - np.array(IMAGENET_MEAN) * 255) / (np.array(IMAGENET_STD) * 255)


def _input_channels(torch_model) -> int:
    import torch
    first_conv = next(m for m in torch_model.modules() if isinstance(m, torch.nn.Conv2d))
    return first_conv.in_channels


def torch_logits(torch_model, images_nhwc: np.ndarray) -> np.ndarray:
    """The reference's eval-mode logits, computed in float64: the exact answer that float32
    implementations (torch's and ours alike) approximate to about 1e-4 in deep networks."""
    import copy

    import torch
    exact = copy.deepcopy(torch_model).double().eval()
    with torch.no_grad():
        out = exact(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()).double())
    return out.numpy()


def flax_logits(model, variables, images_nhwc: np.ndarray) -> np.ndarray:
    import jax
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images_nhwc))


def random_images(size: int, batch: int = 2, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, channels)).astype(np.float32)


def param_count(model, image_size: int) -> int:
    shapes = tree.flatten(models.variable_shapes(model, image_size)["params"])
    return sum(int(np.prod(s.shape)) for s in shapes.values())


def creation_order(model, image_size: int) -> tuple[str, ...]:
    """Top-level parameter names in the order the forward pass creates them, read while
    tracing (``variable_shapes`` returns them sorted, as JAX flattens dicts)."""
    import jax
    import jax.numpy as jnp
    names = []

    def init(x):
        params = model.init(jax.random.key(0), x)["params"]
        names.extend(params)
        return params

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, image_size, image_size, model.in_chans),
                                              jnp.float32))
    return tuple(names)
