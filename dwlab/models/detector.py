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
        cls, ctr, dist, logits = self.head(features)
        anchors = Anchors.grid(
            [tuple(f.shape[-2:]) for f in features], list(self.head.strides), self.anchor_offset, images.device
        )
        distribution = None
        if logits is not None:  # [B, A, 4 (n + 1)] -> [B, A, 4, n + 1]
            flat = _flatten_levels(logits)
            distribution = flat.reshape(*flat.shape[:2], 4, -1)
        return HeadOutputs(
            cls_logits=_flatten_levels(cls),
            centerness=_flatten_levels(ctr).squeeze(-1),
            distances=_flatten_levels(dist),
            anchors=anchors,
            distribution=distribution,
        )


def head_options(cfg: ModelConfig, reg_max: int | None = None, dgqp: bool = False) -> tuple[int | None, bool]:
    """The distribution head's bin count and whether DGQP is on, from ``cfg`` (``model.reg_max``,
    ``model.dgqp``) and what the method needs (``reg_max``, ``dgqp``): either one's ``reg_max``
    (``ValueError`` when both are set and differ), DGQP when either asks for it."""
    if cfg.reg_max is not None and reg_max is not None and cfg.reg_max != reg_max:
        raise ValueError(f"model.reg_max={cfg.reg_max} but the method's head needs reg_max={reg_max}")
    return (cfg.reg_max if cfg.reg_max is not None else reg_max), cfg.dgqp or dgqp


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    *,
    centerness_bias: float | None = None,
    reg_max: int | None = None,
    dgqp: bool = False,
) -> FCOS:
    """The detector of ``cfg``; ``centerness_bias``: the centerness branch's initial bias when
    the method asks for one (``assign.base.HeadInit``; None: 0). ``reg_max`` and ``dgqp``: the
    distribution head and GFLv2's quality predictor when the method needs them (``HeadInit``),
    merged with ``cfg.reg_max`` and ``cfg.dgqp`` by ``head_options``."""
    reg_max, dgqp = head_options(cfg, reg_max, dgqp)
    if cfg.head == "tood" and (reg_max is not None or dgqp):
        raise ValueError(
            f"head=tood with a distribution head (reg_max={reg_max}, dgqp={dgqp}, as gfl and gflv2 need) "
            "is not implemented: GFL's distribution regression is an FCOS-head option"
        )
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
        reg_max=reg_max,
        dgqp=dgqp,
    )
    return FCOS(backbone, head, cfg.anchor_offset)
