"""ResNet / ResNeXt + FPN (P3-P7) from torchvision parts.

P3-P5 come from ResNet stages 2-4 (C3-C5); P6 and P7 from P5's output (P6 = conv(P5),
P7 = conv(relu(P6))), torchvision's ``LastLevelP6P7`` with equal in/out channels.

The trunks are torchvision's definitions (``resnet101``, ``resnext101_64x4d``, ...) and, with
``pretrained=True``, torchvision's ImageNet weights (``IMAGENET1K_V1``). ``dcn=True`` turns the
3x3 conv of every bottleneck of C3-C5 into a DCNv2 (``dwlab.models.dcn``; MMDetection's
``stage_with_dcn=(False, True, True, True)``) after the trunk's weights are loaded: torchvision
has no DCN weights, so the ImageNet trunk loads as it is and only the offset convs are new
(zero, so the network starts on the regular grid).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from dwlab.errors import DwlabError
from dwlab.models.dcn import ModulatedDeformConv2d

STAGE_CHANNELS = {  # output channels of layer2, layer3, layer4
    "resnet10": [128, 256, 512],  # ResNet-18's blocks, one per stage: for CPU smoke runs
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
    "resnet101": [512, 1024, 2048],
    "resnext101_64x4d": [512, 1024, 2048],
}
DCN_STAGES = ("layer2", "layer3", "layer4")  # C3-C5
STRIDES = (8, 16, 32, 64, 128)


def resnet(name: str, pretrained: bool | str, norm: str) -> nn.Module:
    norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    if name == "resnet10":
        if pretrained is True:
            raise DwlabError("model.pretrained: torchvision has no ImageNet weights for resnet10; use false or a path")
        builder = functools.partial(models.ResNet, models.resnet.BasicBlock, [1, 1, 1, 1])
    else:
        builder = getattr(models, name)
    if pretrained is True:
        weights = models.get_model_weights(name).IMAGENET1K_V1
        try:
            return builder(weights=weights, norm_layer=norm_layer)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise DwlabError(
                f"cannot load torchvision's ImageNet weights for {name} ({type(err).__name__}): "
                f"put {Path(weights.url).name} in {hub}, or set model.pretrained to a local "
                "state_dict path, or to false to train from scratch"
            ) from None
    net = builder(norm_layer=norm_layer) if name == "resnet10" else builder(weights=None, norm_layer=norm_layer)
    if isinstance(pretrained, str):
        path = Path(pretrained)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise DwlabError(f"model.pretrained: cannot load {path} ({str(err).splitlines()[0]})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = net.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise DwlabError(
                f"model.pretrained: {path} does not match {name} "
                f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
            )
    return net


def add_dcn(net: nn.Module) -> None:
    """Replace ``conv2`` (the 3x3) of every bottleneck in ``DCN_STAGES`` by a DCNv2 carrying its
    weight. A trunk of basic blocks is refused (MMDetection has no DCN there)."""
    blocks = [block for stage in DCN_STAGES for block in getattr(net, stage)]
    if not all(isinstance(block, models.resnet.Bottleneck) for block in blocks):
        raise DwlabError("model.backbone_dcn: DCNv2 goes into bottleneck blocks (resnet50, resnet101, resnext101_64x4d)")
    for block in blocks:
        block.conv2 = ModulatedDeformConv2d.from_conv(block.conv2)


def _freeze(net: nn.Module, frozen_stages: int) -> None:
    """Freeze the stem (0) and stages 1..frozen_stages; -1 freezes nothing."""
    if frozen_stages < 0:
        return
    frozen = [net.conv1, net.bn1] + [getattr(net, f"layer{i}") for i in range(1, frozen_stages + 1)]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


def build_backbone(
    name: str, *, pretrained: bool | str, norm: str, frozen_stages: int, fpn_channels: int, dcn: bool = False
) -> BackboneWithFPN:
    """ResNet-FPN returning 5 maps (P3..P7) of ``fpn_channels`` channels each; ``dcn``: DCNv2
    in C3-C5 (``add_dcn``)."""
    net = resnet(name, pretrained, norm)
    if dcn:
        add_dcn(net)
    _freeze(net, frozen_stages)
    return BackboneWithFPN(
        net,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=STAGE_CHANNELS[name],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )
