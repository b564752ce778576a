"""transferlab's model zoo: ``create``, ``list_models`` and one module per family."""

from models import lenet, resnet  # noqa: F401  (each family registers its models)
from models.registry import (ModelInfo, create, init_variables, list_models, model_info,
                             variable_shapes)

__all__ = ["ModelInfo", "create", "init_variables", "list_models", "model_info",
           "variable_shapes"]
