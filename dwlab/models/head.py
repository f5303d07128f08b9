"""The FCOS head: shared cls and reg towers over P3-P7, outputs only (no targets, no loss)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _tower(channels: int, num_convs: int, groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.ReLU()]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Per level: cls logits (C), centerness logit (on the reg tower) and (l, t, r, b) distances
    = ReLU(scale_level * conv(reg tower)) * stride, optionally refined (paper Eq. 9-10).
    ``dcn_last``: the last conv of each tower is a DCNv2 (``dwlab.models.dcn``) with the same
    initial weights, as the released DW code's DCN config (``dcn_on_last_conv``)."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        *,
        num_convs: int = 4,
        norm_groups: int = 32,
        prior_prob: float = 0.01,
        reg_bias_init: float = 0.0,
        box_refine: bool = False,
        refine_sampler: str = "deform_conv",
        anchor_offset: float = 0.5,
        centerness_bias: float = 0.0,
        dcn_last: bool = False,
    ) -> None:
        super().__init__()
        self.strides = strides
        self.cls_tower = _tower(channels, num_convs, norm_groups)
        self.reg_tower = _tower(channels, num_convs, norm_groups)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(strides)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(self.bbox_pred.bias, reg_bias_init)
        nn.init.constant_(self.centerness.bias, centerness_bias)  # 0; an assigner's HeadInit may set a prior
        if dcn_last and num_convs:  # MMDetection's dcn_on_last_conv: each tower's last conv is a DCNv2
            from dwlab.models.dcn import ModulatedDeformConv2d

            for tower in (self.cls_tower, self.reg_tower):
                tower[-3] = ModulatedDeformConv2d.from_conv(tower[-3])
        self.refine = None
        if box_refine:
            from dwlab.models.refine import BoxRefine

            self.refine = BoxRefine(channels, refine_sampler, anchor_offset)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """features: per level ``Tensor[B, F, H_l, W_l]``. Returns per-level lists of
        cls ``[B, C, H, W]``, centerness ``[B, 1, H, W]`` and distances ``[B, 4, H, W]`` (the
        refined ones with refinement)."""
        cls_out, ctr_out, dist_out = [], [], []
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            cls_feat = self.cls_tower(feature)
            reg_feat = self.reg_tower(feature)
            cls_out.append(self.cls_logits(cls_feat))
            ctr_out.append(self.centerness(reg_feat))
            # fp32 from here on (as MMDetection): under fp16 autocast, distances above 512 px
            # would step by 0.5 px and overflow to inf past 65504 / stride
            dist = torch.relu(self.scales[level] * self.bbox_pred(reg_feat).float()) * stride
            if self.refine is not None:
                dist = self.refine(reg_feat, dist, stride)
            dist_out.append(dist)
        return cls_out, ctr_out, dist_out
