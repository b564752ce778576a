"""The quickstart's pretraining run on its own (``configs/quickstart.py``'s ``pretrain``
section), a training config for ``scripts.train``; takes the quickstart's variants:

    python -m scripts.train --config configs/quickstart_pretrain.py --workdir runs/quickstart/pretrain

``make demo`` trains it, publishes and verifies the result, and transfers from the published
directory (``configs/quickstart.py:pretrain.init.checkpoint=DIR``).
"""

from configs import quickstart


def get_config(arg=None):
    return quickstart.get_config(arg).pretrain
