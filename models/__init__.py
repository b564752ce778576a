"""transferlab's model zoo: ``create``, ``list_models`` and one module per family."""

from models import lenet, resnet  # noqa: F401  (each family registers its models)
from models import inception  # noqa: F401
from models import vit, xception  # noqa: F401
from models import alexnet, vgg  # noqa: F401
from models import efficientnet, mobilenet  # noqa: F401
from models.registry import (ModelInfo, create, init_variables, list_models, model_info,
                             variable_shapes)

__all__ = ["ModelInfo", "create", "init_variables", "list_models", "model_info",
           "variable_shapes"]
