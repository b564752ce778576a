"""transferlab's model zoo: ``create``, ``list_models`` and one module per family."""

from models.cpu import dispatch as ops

ops.set_cpu_defaults()

from models import lenet, resnet  # noqa: E402,F401  (each family registers its models)
from models import inception  # noqa: E402,F401
from models import vit, xception  # noqa: E402,F401
from models import alexnet, vgg  # noqa: E402,F401
from models import efficientnet, mobilenet  # noqa: E402,F401
from models.registry import (ModelInfo, create, init_variables, list_models,  # noqa: E402
                             model_info, variable_shapes)

__all__ = ["ModelInfo", "create", "init_variables", "list_models", "model_info",
           "variable_shapes"]
