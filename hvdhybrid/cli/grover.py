"""``hvdtrain grover pretrain|finetune|baseline|configs``: GROVER, task x pipeline x data parallel.

Layout: ``--stages K`` cuts each view's GTransformer stack into K pipeline
stages; ``--task-parallel`` puts the node-view and edge-view chains on
different ranks (2K ranks per bundle). Every stage has one rank; the rest of
the world is bundles, data-parallel through Horovod.
"""

from __future__ import annotations

import click

from .grover_tools import baseline, configs
from .grover_train import finetune, pretrain

__all__ = ["grover"]


@click.group()
def grover() -> None:
    """GROVER (graph transformer on molecules): self-supervised pretraining and finetuning.

    Task parallel (--task-parallel: node-view and edge-view encoders on two
    ranks), pipeline (--stages K), and data parallel (the other ranks form
    bundles). `hvdtrain grover configs` lists the named model sizes.
    """


for _command in (pretrain, finetune, baseline, configs):
    grover.add_command(_command)
