"""The model's input from raw images: what a checkpoint's weights expect, applied on device.

A spec (stored in every checkpoint's meta) has ``mean`` and ``std`` on the 0–255 scale, the
``input_size`` the weights were trained at (0: keep the images' size), the ``channel_order``
("RGB", or "BGR" for Caffe-style weights) and the ``interpolation`` used to resize.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def make_spec(mean: Sequence[float] = (127.5,), std: Sequence[float] = (127.5,),
              input_size: int = 0, channel_order: str = "RGB",
              interpolation: str = "bilinear", **extra) -> dict:
    return dict(mean=[float(m) for m in mean], std=[float(s) for s in std],
                input_size=int(input_size), channel_order=channel_order,
                interpolation=interpolation, **extra)


def apply(images: jax.Array, spec: dict, dtype=jnp.float32) -> jax.Array:
    """Raw NHWC images in [0, 255] → normalised, resized model input."""
    x = images.astype(jnp.float32)
    size = spec.get("input_size") or 0
    if size and x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]),
                             method=spec.get("interpolation", "bilinear"))
    if spec.get("channel_order", "RGB") == "BGR":
        x = x[..., ::-1]
    mean, std = jnp.asarray(spec["mean"], jnp.float32), jnp.asarray(spec["std"], jnp.float32)
    if x.shape[-1] == 1 and mean.size > 1:  # grayscale into an RGB-pretrained network
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    return ((x - mean) / std).astype(dtype)
