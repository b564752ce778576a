"""The CPU speed layer: faster formulations of the operations ``models.layers`` builds on.

``models.layers`` is its one caller among the models (``from models import cpu``). Each function
exported here equals the JAX or Flax operation it names, on every backend, to the tolerance its
docstring states; on the CPU it may run another formulation, elsewhere XLA's own. Inside
``with xla_lowering_only():`` every one traces to XLA's own lowering (for ``cost_analysis``,
which counts no flops in a native call).

- ``dispatch.py``: the functions exported here, and ``conv_kernel``, the one place that
  chooses a convolution's formulation;
- ``native.py``: the native library (``csrc/``: this project's kernels, oneDNN's and MKL's) as
  XLA FFI calls, its build, and ``per_image``, the batch sharding of every call;
- ``winograd.py``: 3×3 stride-1 convolutions as Winograd's F(4×4, 3×3) where oneDNN has none;
- ``process.py``, ``buffer_cache.c``: XLA:CPU's flags, and the opt-in memory settings;
- ``switches.py``: the table of the layer's environment switches, the one place that reads them.
"""

from models.cpu.dispatch import (ACTIVATIONS, add_to_each_image, batch_norm, bias_gelu,
                                 conv_general_dilated, dot_general, gelu, hard_sigmoid,
                                 hard_swish, layer_norm, materialize, max_pool, residual_relu,
                                 self_attention)
from models.cpu.native import disabled as xla_lowering_only

__all__ = ["ACTIVATIONS", "add_to_each_image", "batch_norm", "bias_gelu", "conv_general_dilated",
           "dot_general", "gelu", "hard_sigmoid", "hard_swish", "layer_norm", "materialize",
           "max_pool", "residual_relu", "self_attention", "xla_lowering_only"]
