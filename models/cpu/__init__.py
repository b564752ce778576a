"""The CPU speed layer: faster formulations of the operations ``models.layers`` builds on.

``models.layers`` is its only caller among the models. Each function here equals the JAX or
Flax operation it names, on every backend; on the CPU it may run another formulation (native
kernels, or a form XLA:CPU compiles better), elsewhere XLA's own lowering. ``switches.py``
lists the environment switches that turn its parts off.
"""

from models.cpu.dispatch import (ACTIVATIONS, add_to_each_image, batch_norm, bias_gelu,
                                 conv_general_dilated, dot_general, gelu, hard_sigmoid,
                                 hard_swish, layer_norm, materialize, max_pool, residual_relu,
                                 self_attention)

__all__ = ["ACTIVATIONS", "add_to_each_image", "batch_norm", "bias_gelu", "conv_general_dilated",
           "dot_general", "gelu", "hard_sigmoid", "hard_swish", "layer_norm", "materialize",
           "max_pool", "residual_relu", "self_attention"]
