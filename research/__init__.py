"""transferlab's research code: data, freezing, optimizers, training, checkpoints, conversion."""
