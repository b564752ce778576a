"""transferlab's model zoo: ``create``, ``list_models`` and one module per family.

Importing it sets XLA:CPU's flags (``models.cpu.process.set_xla_flags``) and changes nothing
else outside this package.
"""

from models import (alexnet, efficientnet, inception, lenet, mobilenet, resnet,  # noqa: F401
                    vgg, vit, xception)  # each family registers its models
from models.cpu import process
from models.registry import (ModelInfo, create, init_variables, list_models, model_info,
                             variable_shapes)

# The imports above leave JAX's backends unstarted, so that the flags take effect.
process.set_xla_flags()

__all__ = ["ModelInfo", "create", "init_variables", "list_models", "model_info",
           "variable_shapes"]
