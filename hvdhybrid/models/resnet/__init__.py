"""ResNets as chains of layer factories to cut into stages.

    small       the quick default: basic blocks at ``--width``, sized for 16x16 images
    arch        ResNet-18/34/50/101/152 with torchvision's module and parameter names; the stem,
                layer1..layer4 and the head are the units ``--partition`` cuts
    weights     a torchvision-format state dict file (``--init``) checked and loaded by name

GroupNorm is the default normalisation: batch statistics would depend on how a
batch is cut into microbatches and replicas. ``norm="batch"`` gives BatchNorm,
whose result then depends on the microbatch size (GPipe's paper notes the same).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._lazy import exports

__all__ = ["ARCHS", "NORMS", "BasicBlock", "Bottleneck", "InitFile", "norm_layer", "resnet_layer_fns",
           "resnet_layers", "torchvision_layer_fns"]
__getattr__ = exports(__name__, {
    "ARCHS": "arch", "Bottleneck": "arch", "torchvision_layer_fns": "arch",
    "BasicBlock": "small", "NORMS": "small", "norm_layer": "small", "resnet_layer_fns": "small",
    "resnet_layers": "small", "InitFile": "weights",
})

if TYPE_CHECKING:
    from .arch import ARCHS, Bottleneck, torchvision_layer_fns
    from .small import NORMS, BasicBlock, norm_layer, resnet_layer_fns, resnet_layers
    from .weights import InitFile
