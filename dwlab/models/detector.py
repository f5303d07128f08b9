"""FCOS (Tian et al., ICCV 2019): ResNet-FPN + shared head. The same detector for every
label-assignment method; ``forward`` always returns raw ``HeadOutputs``. The head is FCOS's
(``model.head: fcos``) or TOOD's T-head (``tood``, ``dwlab.models.thead``): the same outputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dwlab.config import ModelConfig
from dwlab.models.backbone import STRIDES, build_backbone
from dwlab.models.head import FCOSHead
from dwlab.models.outputs import Anchors, HeadOutputs
from dwlab.models.thead import THead


def _flatten_levels(maps: list[Tensor]) -> Tensor:
    """Per-level ``[B, K, H, W]`` -> ``[B, A, K]`` (row-major, P3 first)."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


class FCOS(nn.Module):
    def __init__(self, backbone: nn.Module, head: FCOSHead | THead, anchor_offset: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.anchor_offset = anchor_offset

    def forward(self, images: Tensor) -> HeadOutputs:
        """images ``Tensor[B, 3, H, W]`` normalised and padded to a multiple of 32."""
        features = list(self.backbone(images).values())
        cls, ctr, dist = self.head(features)
        anchors = Anchors.grid(
            [tuple(f.shape[-2:]) for f in features], list(self.head.strides), self.anchor_offset, images.device
        )
        return HeadOutputs(
            cls_logits=_flatten_levels(cls),
            centerness=_flatten_levels(ctr).squeeze(-1),
            distances=_flatten_levels(dist),
            anchors=anchors,
        )


def build_model(cfg: ModelConfig, num_classes: int, *, centerness_bias: float | None = None) -> FCOS:
    """The detector of ``cfg``; ``centerness_bias``: the centerness branch's initial bias when
    the method asks for one (``assign.base.HeadInit``; None: 0)."""
    pretrained = cfg.pretrained
    if pretrained == "synth":  # the cached domain-pretrained trunk (dwlab.pretrain)
        from dwlab.pretrain import cached_backbone

        pretrained = str(cached_backbone(cfg.backbone, cfg.pretrain))
    backbone = build_backbone(
        cfg.backbone,
        pretrained=pretrained,
        norm=cfg.norm,
        frozen_stages=cfg.frozen_stages,
        fpn_channels=cfg.fpn_channels,
        dcn=cfg.backbone_dcn,
    )
    if cfg.head == "tood":
        head = THead(
            cfg.fpn_channels,
            num_classes,
            STRIDES,
            stacked_convs=cfg.thead_convs,
            norm_groups=cfg.head_norm_groups,
            prior_prob=cfg.prior_prob,
            anchor_offset=cfg.anchor_offset,
            centerness_bias=0.0 if centerness_bias is None else centerness_bias,
        )
        return FCOS(backbone, head, cfg.anchor_offset)
    head = FCOSHead(
        cfg.fpn_channels,
        num_classes,
        STRIDES,
        num_convs=cfg.head_convs,
        norm_groups=cfg.head_norm_groups,
        prior_prob=cfg.prior_prob,
        reg_bias_init=cfg.reg_bias_init,
        box_refine=cfg.box_refine,
        refine_sampler=cfg.refine_sampler,
        anchor_offset=cfg.anchor_offset,
        centerness_bias=0.0 if centerness_bias is None else centerness_bias,
        dcn_last=cfg.head_dcn,
    )
    return FCOS(backbone, head, cfg.anchor_offset)
