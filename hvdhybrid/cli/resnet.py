"""``hvdtrain resnet``: a ResNet cut into front and rear parts per bundle (bundle-based hybrids)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import click
from click.core import ParameterSource

from ..comm.agreement import agreed, world
from ..config import Config
from ..layout.topology import LayoutError
from ..log import get_logger
from .options import config_options
from .sequential import sequential_build
from .session import Built, run_model

__all__ = ["resnet"]


ARCH_CHOICES = ("small", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _deep_defaults(cfg: Config) -> Config:
    """resnet18..152's own defaults where the command line gave none: ``--lr 0.01`` (0.05, --arch
    small's, diverges for them) and ``--partition time`` (most of the compute is in the units with
    the fewest parameters: a cut by parameters measured 1.3x slower at 2 bundles x 1,1)."""
    source = click.get_current_context().get_parameter_source
    if source("lr") is ParameterSource.DEFAULT:
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.01))
    if source("partition") is ParameterSource.DEFAULT:
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, partition="time"))
    return cfg


@click.command()
@config_options(steps=150, batch_size=64, lr=0.05, microbatches=4)
@click.option("--arch", type=click.Choice(ARCH_CHOICES), default="small", show_default=True,
              help="small: basic blocks at --width for small images; resnet18..152: torchvision's "
                   "architectures and parameter names (bottleneck blocks from resnet50 on).")
@click.option("--norm", type=click.Choice(("group", "batch")), default="group", show_default=True,
              help="group: GroupNorm, the same result at every layout; batch: BatchNorm with statistics "
                   "per microbatch (the result then depends on the microbatch size).")
@click.option("--init", "init", type=click.Path(), default=None,
              help="A torchvision-format state dict (torch.save(model.state_dict(), FILE)) to start from; "
                   "read offline.")
@click.option("--data", type=click.Path(), default=None,
              help="Image folder (one subfolder per class); default: scikit-learn's digits.")
@click.option("--image-size", type=int, default=16, show_default=True)
@click.option("--width", type=int, default=None, help="Channels of the first block of --arch small [16].")
@click.option("--dp-only", is_flag=True, help="Pure data parallelism: one stage per bundle.")
def resnet(cfg: Config, arch: str, norm: str, init: Optional[str], data: Optional[str], image_size: int,
           width: Optional[int], dp_only: bool) -> None:
    """ResNet split into front and rear parts per bundle (bundle-based hybrid parallelism).

    Default layout: 2 stages (front, rear) per bundle when the world size is
    even, else one; --dp-only: one stage per bundle, all bundles data-parallel.
    --arch resnet18..152 is six units for --partition to cut: the stem,
    layer1..layer4 and the head; their defaults are --lr 0.01 and --partition time.
    """
    from ..models.resnet import InitFile, resnet_layer_fns, torchvision_layer_fns
    from ..parallel.staged import Part, meta_layers
    from ..training.data import DataError, digits, image_folder

    w = world()
    if arch != "small":
        cfg = _deep_defaults(cfg)
    with agreed(w):
        if dp_only and (cfg.parallel.stages or cfg.parallel.bundle_shape):
            raise LayoutError("--dp-only means one stage per bundle; drop --stages/--bundle-shape")
        if width is not None and arch != "small":
            raise LayoutError(f"--width sets the channels of --arch small; {arch} has torchvision's "
                              "widths: drop --width")
        if image_size < 1:
            raise DataError(f"--image-size must be >= 1, got {image_size}")
        default = (1,) if dp_only or w.Get_size() % 2 else (1, 1)
        if data:
            ds, classes = image_folder(data, image_size)
        else:
            ds, classes = digits(image_size), [str(i) for i in range(10)]
            if arch != "small":  # torchvision's stem takes RGB: grey digits as three equal channels
                ds = dataclasses.replace(ds, x=ds.x.expand(-1, 3, -1, -1).contiguous())
        channels = int(ds.x.shape[1])

        def fns() -> list[Any]:
            if arch == "small":
                return resnet_layer_fns(channels, len(classes), width or 16, norm=norm)
            return torchvision_layer_fns(arch, channels, len(classes), norm)
        start = None
        if init:
            start = InitFile.read(init, Part(meta_layers(fns()), 0).state_dict(), f"--arch {arch}")
            if w.Get_rank() == 0:
                for note in start.notes:
                    get_logger().info(note)
    build = sequential_build(cfg, fns, ds)

    def with_init(num_stages: int, layout: Any) -> Built:
        built = build(num_stages, layout)
        if start is None:
            return built
        inner = built.model.builder
        model = dataclasses.replace(built.model, builder=lambda s: start.load_into(inner(s)))
        return dataclasses.replace(built, model=model)
    run_model("resnet", cfg, default, with_init)
