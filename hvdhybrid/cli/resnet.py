"""``hvdtrain resnet``: a ResNet cut into front and rear parts per bundle (bundle-based hybrids)."""

from __future__ import annotations

from typing import Optional

import click

from ..comm.agreement import agreed, world
from ..config import Config
from ..layout.topology import LayoutError
from .options import config_options
from .sequential import sequential_build
from .session import run_model

__all__ = ["resnet"]


@click.command()
@config_options(steps=150, batch_size=64, lr=0.05, microbatches=4)
@click.option("--data", type=click.Path(), default=None,
              help="Image folder (one subfolder per class); default: scikit-learn's digits.")
@click.option("--image-size", type=int, default=16, show_default=True)
@click.option("--width", type=int, default=16, show_default=True, help="Channels of the first block.")
@click.option("--dp-only", is_flag=True, help="Pure data parallelism: one stage per bundle.")
def resnet(cfg: Config, data: Optional[str], image_size: int, width: int, dp_only: bool) -> None:
    """ResNet split into front and rear parts per bundle (bundle-based hybrid parallelism).

    Default layout: 2 stages (front, rear) per bundle when the world size is
    even, else one; --dp-only: one stage per bundle, all bundles data-parallel.
    """
    from ..models.resnet import resnet_layer_fns
    from ..training.data import digits, image_folder

    w = world()
    with agreed(w):
        if dp_only and (cfg.parallel.stages or cfg.parallel.bundle_shape):
            raise LayoutError("--dp-only means one stage per bundle; drop --stages/--bundle-shape")
        default = (1,) if dp_only or w.Get_size() % 2 else (1, 1)
        if data:
            ds, classes = image_folder(data, image_size)
        else:
            ds, classes = digits(image_size), [str(i) for i in range(10)]
    channels = int(ds.x.shape[1])
    run_model("resnet", cfg, default, sequential_build(
        cfg, lambda: resnet_layer_fns(channels, len(classes), width), ds))
